"""What the model's `ruler_cwe` answers are: one or two words repeated, a run of consecutive list entries, or other
list words; and the share of the list's entries that are answer words (the base rate a copied word scores).

    python benchmarks/results/ruler/n20/cwe_kinds.py benchmarks/results/ruler/n20/memkit_32k_ruler_cwe_leadfix/ruler.jsonl 32768 memkit
    python benchmarks/results/ruler/n20/cwe_kinds.py benchmarks/results/ruler/r4k.json 4096 full   # a ruler.json works too

Reads the samples `memkit eval ruler` cached under $MEMKIT_CACHE/ruler (default ~/.cache/memkit/ruler).
"""

import glob
import json
import os
import re
import sys

path, length, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cache = os.environ.get("MEMKIT_CACHE", os.path.expanduser("~/.cache/memkit"))
docs = {x["index"]: x for x in json.load(open(glob.glob(f"{cache}/ruler/ruler_cwe-{length}-*.json")[0]))["docs"]}
rows = json.load(open(path))["results"] if path.endswith(".json") else [json.loads(line) for line in open(path)]
rows = [r for r in rows if r.get("task") == "ruler_cwe" and r.get("mode") == mode]
kinds: dict[str, list[float]] = {}
share = []
for r in rows:
    x = docs[r["index"]]
    body = x["input"].split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion:")[0]
    words = re.findall(r"\d+\. (\S+)", body)  # the list's entries, in order
    answers, entries = set(x["outputs"]), set(words)
    share.append(sum(w in answers for w in words) / len(words))
    said = list(dict.fromkeys(w for w in re.findall(r"[a-z][a-z\-]+", r["prediction"].lower()) if w in entries))
    if len(said) <= 2:
        kind = "one or two words repeated"
    else:
        at = {w: [i for i, v in enumerate(words) if v == w] for w in said[:5]}
        run = any(all(s + j in at[w] for j, w in enumerate(said[:5])) for s in at[said[0]])
        kind = "a run of consecutive entries" if run else "other list words"
    kinds.setdefault(kind, []).append(r["score"])
print(f"{mode} {length}: {len(rows)} samples, answer words are {sum(share) / len(share):.1%} of the list's entries")
for kind, scores in sorted(kinds.items()):
    print(f"  {kind}: {len(scores)} samples, mean score {sum(scores) / len(scores):.3f}")
