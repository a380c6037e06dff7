"""Turn a pytest-benchmark JSON file into ratio tables (markdown).

    python benchmarks/summarize.py out/bench.json > out/bench.md

For every group: each provider's median time, its time relative to the ext op (how many
times slower than ext; < 1 means faster than ext), the achieved GB/s for pooling and the
tokens/s for embedding extraction. Where a case recorded a device time (CUDA events, see
benchmarks/timing.py) that is the time used, and the GB/s is also given as a fraction of the
copy bandwidth measured in the same run.
"""

import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        median = info.get("device_s", b["stats"]["median"])
        groups[b["group"]][info.get("provider", b["name"])] = (median, info)
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('system', '')} "
          f"python {machine.get('python_version', '')}; {data.get('datetime', '')}\n")
    print("| group | provider | median ms | time / ext | GB/s | of copy | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for group in sorted(groups):
        rows = groups[group]
        ext = rows.get("ext", (None,))[0]
        for provider, (median, info) in sorted(rows.items(), key=lambda kv: kv[1][0]):
            ratio = f"{median / ext:.2f}x" if ext else "-"
            gbs = f"{info['bytes_read'] / median / 1e9:.1f}" if "bytes_read" in info else ""
            tps = f"{info['tokens_per_s']:,.0f}" if "tokens_per_s" in info else ""
            of_copy = ""
            if "bytes_read" in info and info.get("copy_GBps"):
                of_copy = f"{info['bytes_read'] / median / 1e9 / info['copy_GBps']:.0%}"
            print(f"| {group} | {provider} | {median * 1e3:.3f} | {ratio} | {gbs} | {of_copy} | {tps} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/bench.json")
