"""One JSON result per line on stdin -> the Markdown table benchmarks/RESULTS.md keeps."""

import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
print("| consumer | version | formats | result | detail |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {r['consumer']} | {r.get('version', '')} | {r.get('formats', '')} | {r['result']} | {r.get('detail', '')} |")
