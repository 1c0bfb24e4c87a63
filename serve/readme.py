"""The README.md written beside the serving files: what each file is and how to serve with it."""

from __future__ import annotations

from typing import Any

_USAGE = """\
## Serving a user

```python
import json
import faiss, numpy as np, onnxruntime as ort

folder = "{first}"
info = json.load(open(f"{{folder}}/items.json"))
index = faiss.read_index(f"{{folder}}/items.faiss")
tower = ort.InferenceSession(f"{{folder}}/user_tower.onnx", providers=["CPUExecutionProvider"])

# the user's history, oldest first, as catalog indices (info["ids"][c] is the item id of index c);
# keep the most recent info["user_tower"]["max_seq_len"] items; pad rows of a batch on the right with -1
history = np.array([[3, 17, 5]], dtype=np.int64)
user = tower.run(None, {{"history": history}})[0]          # (batch, dim) float32, unit vectors
seen = set(history[history >= 0].tolist())
scores, rows = index.search(user, 10 + len(seen))          # inner product = the model's cosine score
top10 = [info["ids"][c] for c in rows[0] if c not in seen][:10]
```

- `user_tower.onnx`: input `history` int64 (batch, length), catalog indices right-padded with -1, at least one
  real item per row and at most `max_seq_len` positions (longer histories: keep the last `max_seq_len` items);
  output `user` float32 (batch, dim), the unit user vector. The item embeddings (`table`) are baked into the
  graph, so the tower needs nothing else.
- `items.faiss`: an exact `IndexFlatIP` over the unit item vectors; FAISS id = row = catalog index. Search with the
  tower's output; the inner product is the model's score (cosine similarity; the training temperature only
  scales it). Evaluation also leaves out the items the user has already met: ask for `k + len(seen)` and drop
  them, as above.
- `item_embeddings.safetensors`: `vectors` (the index's rows) and `table` (the embeddings histories are made of),
  row c = catalog index c, for another vector store (`safetensors.numpy.load_file`).
- `items.json`: the item ids per row, the dimension, the metric, the model the files were made from (path and
  SHA-256 of its files), the tower's interface and the result of the export check (`user_tower.check`: the
  largest difference between the tower's and the model's user vectors on held-out users).

Top-10 of FAISS with the tower's vectors equal the model's own full ranking (`python -m pretrain.evaluate`) up to
ties and float32 rounding. A catalog change (new items) needs a new run of `python -m serve`: item vectors and
the tower's table come from the model's item encoders.
"""


def readme(doc: dict[str, Any]) -> str:
    """README.md of an output folder, from its ``serve.json`` document."""
    model = doc["model"]
    rows = [f"| `{name}/` | {d['n_items']} | {d['dim']} |" for name, d in doc["domains"].items()]
    lines = [
        "# Serving files",
        "",
        f"Written by `python -m serve` from the {model['stage']} model `{model['path']}`: one folder per domain,",
        "each ranked against its own catalog.",
        "",
        "| folder | items | dim |",
        "|---|---|---|",
        *rows,
        "",
        "Each folder holds `item_embeddings.safetensors`, `items.json`, `items.faiss` and `user_tower.onnx`.",
        "",
    ]
    first = next(iter(doc["domains"].values()))["folder"]
    return "\n".join(lines) + "\n" + _USAGE.format(first=first)
