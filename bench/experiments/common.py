"""What the one-off experiment scripts share: their two options, the results header, the
rounded one-line print of a result row and the JSON file they leave in ``$OUT``.

Example::

    args, res = experiment_args()            # --tokens (131072), --json PATH
    res["rows"].append(row); print(rounded(row), flush=True)
    save(args, res)
"""
import argparse
import json
from typing import Any

import torch


def experiment_args(**sections: Any) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse ``--tokens`` and ``--json``; the results dict starts with the GPU, the token
    count and the given empty ``sections``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    return args, {"device": torch.cuda.get_device_name(), "tokens": args.tokens, **sections}


def rounded(row: dict[str, Any]) -> str:
    """``row`` as one JSON line, floats (and lists of them) to 3 decimals."""
    def r(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 3)
        return [r(x) for x in v] if isinstance(v, list) else v
    return json.dumps({k: r(v) for k, v in row.items()})


def save(args: argparse.Namespace, res: dict[str, Any]) -> None:
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
