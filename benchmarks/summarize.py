"""Turn a pytest-benchmark JSON file into ratio tables (markdown).

    python benchmarks/summarize.py out/bench.json > out/bench.md

For every group: each provider's median time, its time relative to the ext op (how many
times slower than ext; < 1 means faster than ext), the achieved GB/s for pooling and the
tokens/s for embedding extraction. Where a case recorded a device time (CUDA events, see
benchmarks/timing.py) that is the time used, and the GB/s is also given as a fraction of the
copy bandwidth measured in the same run. A benchmark without a group (pytest-benchmark
leaves ``group`` null unless the benchmark sets one) is listed under its own name.
"""

import json
import sys
from collections import defaultdict


def median_s(bench: dict) -> float:
    """The time a row reports: the device time where one was recorded, else the host median."""
    return bench.get("extra_info", {}).get("device_s", bench["stats"]["median"])


def table(data: dict) -> str:
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        group = b.get("group") or b.get("name") or "?"
        groups[str(group)][str(info.get("provider", b.get("name", "?")))] = (median_s(b), info)
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('system', '')} "
        f"python {machine.get('python_version', '')}; {data.get('datetime', '')}",
        "",
        "| group | provider | median ms | time / ext | GB/s | of copy | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for group in sorted(groups):
        rows = groups[group]
        ext = rows.get("ext", (None,))[0]
        for provider, (median, info) in sorted(rows.items(), key=lambda kv: (kv[1][0], kv[0])):
            ratio = f"{median / ext:.2f}x" if ext else "-"
            gbs = f"{info['bytes_read'] / median / 1e9:.1f}" if "bytes_read" in info and median > 0 else ""
            tps = f"{info['tokens_per_s']:,.0f}" if "tokens_per_s" in info else ""
            of_copy = ""
            if gbs and info.get("copy_GBps"):
                of_copy = f"{info['bytes_read'] / median / 1e9 / info['copy_GBps']:.0%}"
            lines.append(f"| {group} | {provider} | {median * 1e3:.3f} | {ratio} | {gbs} | {of_copy} | {tps} |")
    return "\n".join(lines)


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/bench.json")
