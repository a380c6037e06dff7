"""Write the files the consumers check loads: the demo run's weights exported plain, with a
capped token budget, and a two-stage schedule; plus expected.json, the weights each must carry.

Usage: python make_exports.py WORK [WEIGHTS_JSON]. WEIGHTS_JSON defaults to runs/demo/weights/
weights.json (``make run``); without it, a fixed mixture over the built-in domains is used and
expected.json says so. The budget is planned on the built-in data's training tokens.
"""

import json
import os
import sys

from chameleon_ext.budget import plan_token_budget
from chameleon_ext.data import builtin_dataset_path, load_dataset
from chameleon_ext.exports import load_weights, trainer_weights, write_exports
from chameleon_ext.formats.schedules import write_schedule_exports

work = sys.argv[1]
source = sys.argv[2] if len(sys.argv) > 2 else "runs/demo/weights/weights.json"
if os.path.exists(source):
    doc = load_weights(source)
    doc.pop("budget", None)
    origin = source
else:  # a skewed mixture like the demo's (one domain far above its share of the data)
    w = {"books": 0.08, "code": 0.12, "dna": 0.02, "math": 0.52, "news": 0.14, "tables": 0.02, "web": 0.10}
    doc = {"format": "chameleon_ext.weights/2", "mode": "pretrain", "domains": list(w), "weights": w}
    origin = "fixed demo-like mixture (no runs/demo/weights/weights.json)"
ds = load_dataset(builtin_dataset_path())
counts = {d: ds.n_tokens(d, "train") for d in doc["domains"]}
budget = int(0.6 * sum(counts.values()))  # a cap of 1 epoch binds for the heaviest domains
plan = plan_token_budget(doc["weights"], counts, budget, max_epochs=1.0)
budget_doc = dict(doc, budget=plan.as_dict())
prefixes = {d: os.path.join(work, "data", d) for d in doc["domains"]}
expected = {"origin": origin, "domains": doc["domains"], "prefixes": prefixes, "capped": plan.capped_domains,
            "token_counts": counts, "token_budget": budget}
for name, d in (("plain", doc), ("budget", budget_doc)):
    write_exports(d, os.path.join(work, name), prefixes=prefixes)
    expected[name] = trainer_weights(load_weights(d))
stages = [dict(doc["weights"]), dict(expected["budget"])]
schedule = {"format": "chameleon_ext.schedule/1", "domains": doc["domains"], "token_budget": 4096 * 100,
            "tokens_per_step": 4096, "entries": [{"start_step": 0, "start_token": 0, "weights": stages[0]},
                                                 {"start_step": 60, "start_token": 60 * 4096, "weights": stages[1]}]}
write_schedule_exports(schedule, os.path.join(work, "schedule"), prefixes=prefixes)
expected["schedule"] = [[0, stages[0]], [60, stages[1]]]
with open(os.path.join(work, "expected.json"), "w") as f:
    json.dump(expected, f, indent=2)
print(f"exports of {origin} in {work}; capped under the budget: {plan.capped_domains}")
