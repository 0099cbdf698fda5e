"""Write python_qa.jsonl: a small instruction set for the quickstart fine-tune, built from this
interpreter's own standard library (the quickstart model pretrains on its source).

Each record asks what a public function does (answer: its docstring's first paragraph) or for
its signature (answer: a `def` line); every tenth record uses the chat `messages` form.
Run from the repository root: python configs/finetune/data/make_python_qa.py
"""

import importlib
import inspect
import json
import random
from pathlib import Path

MODULES = ["json", "os.path", "math", "string", "textwrap", "itertools", "functools", "collections",
           "re", "shutil", "statistics", "random", "heapq", "bisect", "fnmatch", "glob", "base64",
           "html", "operator", "copy", "difflib", "csv", "pathlib", "tempfile", "zlib", "urllib.parse"]


def records():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(getattr(module, "__all__", dir(module))):
            obj = getattr(module, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            summary = doc.split("\n\n")[0].strip()
            if 20 <= len(summary) <= 400:
                yield f"What does `{module_name}.{name}` do?", summary
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            yield f"Give the signature of `{module_name}.{name}`.", f"def {name}{signature}:"


def main() -> None:
    items = list(records())
    random.Random(0).shuffle(items)
    lines = []
    for i, (prompt, response) in enumerate(items):
        if i % 10 == 0:
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
        else:
            record = {"prompt": prompt, "response": response}
        lines.append(json.dumps(record))
    out = Path(__file__).with_name("python_qa.jsonl")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} records to {out}")


if __name__ == "__main__":
    main()
