"""ESM-2 checkpoints: resolve, load safely, make random test models, fetch.

A checkpoint argument is either a fair-esm model name (``esm2_t33_650M_UR50D``),
looked up as ``$TORCH_HOME/hub/checkpoints/<name>.pt``, or a path to a ``.pt`` file
in fair-esm's format. Nothing here downloads except :func:`fetch_model`.

Example::

    model, alphabet = load_esm2(resolve_checkpoint("esm2_t33_650M_UR50D"))
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import structlog
import torch

log = structlog.get_logger()

# Architectures of the public ESM-2 checkpoints: name -> (layers, dim, heads).
ESM2_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}


class ModelNotFoundError(FileNotFoundError):
    """The checkpoint file is missing; the message names the path and how to get it."""


class CheckpointError(ValueError):
    """The file exists but is not an ESM-2 checkpoint in fair-esm's format."""


def hub_checkpoint_dir() -> Path:
    """fair-esm's download directory: ``$TORCH_HOME/hub/checkpoints`` (torch's rules)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_path_spec(spec: str) -> bool:
    """A spec naming a file (``*.pt`` or containing a path separator) rather than a model name."""
    return spec.endswith(".pt") or os.sep in spec or "/" in spec


def resolve_checkpoint(spec: str) -> Path:
    """Map a model argument to an existing checkpoint file, without downloading.

    Raises :class:`ModelNotFoundError` naming the path that was looked at and the fix.
    """
    if is_path_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"model checkpoint {str(path)!r} does not exist. Pass a fair-esm model name "
                f"(e.g. esm2_t33_650M_UR50D) or the path of an existing .pt file; "
                f"`vnpd make-test-model {path}` writes a random-weight test model.")
        return path
    path = hub_checkpoint_dir() / f"{spec}.pt"
    if not path.is_file():
        raise ModelNotFoundError(
            f"model {spec!r} is not in the torch hub checkpoint directory: {str(path)!r} "
            f"does not exist. vnpd never downloads in `run` or `embed`; fetch it once with "
            f"`vnpd fetch-model {spec}` (uses TORCH_HOME={hub_checkpoint_dir().parent.parent}), "
            f"or pass the path of a .pt file.")
    return path


def _torch_load(path: Path) -> Any:
    # fair-esm checkpoints pickle an argparse.Namespace; torch>=2.6 loads with
    # weights_only=True by default and refuses it. Allow exactly that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def regression_path_for(path: Path) -> Path:
    """fair-esm's contact-regression file name beside a checkpoint."""
    return path.with_name(path.stem + "-contact-regression.pt")


def load_esm2(path: Path) -> tuple[torch.nn.Module, Any]:
    """Load an ESM-2 checkpoint into fair-esm's own ``ESM2`` module (eval mode, CPU, fp32).

    The contact-regression file is loaded when present (fair-esm requires it for contact
    prediction only, which vnpd does not use). Raises :class:`CheckpointError` for files that
    are not ESM-2 checkpoints.
    """
    import esm.pretrained

    try:
        data = _torch_load(path)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: not a loadable fair-esm checkpoint: {exc}") from exc
    if not isinstance(data, dict) or "cfg" not in data or "model" not in data:
        raise CheckpointError(f"{path}: not an ESM-2 checkpoint (expected keys 'cfg' and 'model')")
    regression = None
    reg_path = regression_path_for(path)
    if reg_path.is_file():
        regression = _torch_load(reg_path)
    # fair-esm picks the ESM-2 code path by the name's prefix; the file name may be anything.
    model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2_local", data, regression)
    model.eval()
    log.info("model_loaded", path=str(path), layers=model.num_layers, dim=model.embed_dim,
             heads=model.attention_heads, contact_regression=regression is not None)
    return model, alphabet


def make_test_model(out: Path, *, layers: int = 2, dim: int = 64, heads: int = 4,
                    seed: int = 0) -> tuple[Path, Path]:
    """Write a random-weight ESM-2 in fair-esm's exact file format, plus its regression file.

    Returns (checkpoint, regression) paths. The weights are random: embeddings from it
    mean nothing biologically; it exists for tests and the demo.
    """
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    if dim % heads or (dim // heads) % 2:
        raise ValueError(f"dim ({dim}) must split into {heads} heads of even size")
    torch.manual_seed(seed)
    alphabet = Alphabet.from_architecture("ESM-1b")
    model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet,
                 token_dropout=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                # Non-trivial norms and biases so that tests exercise them.
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return save_esm2_checkpoint(model, out, seed=seed)


def save_esm2_checkpoint(model: torch.nn.Module, out: Path, *, seed: int | None = None
                         ) -> tuple[Path, Path]:
    """Write a fair-esm ``ESM2`` module in fair-esm's checkpoint format, plus the
    ``<stem>-contact-regression.pt`` file fair-esm's local loader requires beside it.

    Marked ``vnpd_random_test_model`` in its cfg: vnpd only writes random-weight models.
    """
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state = {f"encoder.sentence_encoder.{k}": v for k, v in weights.items()
             if not k.startswith("contact_head.regression")}
    cfg = argparse.Namespace(encoder_layers=model.num_layers, encoder_embed_dim=model.embed_dim,
                             encoder_ffn_embed_dim=4 * model.embed_dim,
                             encoder_attention_heads=model.attention_heads,
                             token_dropout=model.token_dropout, arch="ESM-1b",
                             vnpd_random_test_model=True, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, str(out))
    reg = regression_path_for(out)
    torch.save({"model": {k: v for k, v in weights.items()
                          if k.startswith("contact_head.regression")}}, str(reg))
    return out, reg


def fetch_model(name: str) -> Path:
    """Download a fair-esm checkpoint and its regression file into the torch hub directory.

    The only network access in vnpd. Files already present are kept.
    """
    if name not in ESM2_ARCHITECTURES:
        raise ValueError(f"unknown ESM-2 model {name!r}; known: {', '.join(ESM2_ARCHITECTURES)}")
    target = hub_checkpoint_dir()
    target.mkdir(parents=True, exist_ok=True)
    base = "https://dl.fbaipublicfiles.com/fair-esm"
    for url in (f"{base}/models/{name}.pt", f"{base}/regression/{name}-contact-regression.pt"):
        dest = target / url.rsplit("/", 1)[1]
        if dest.is_file():
            log.info("fetch_model_present", path=str(dest))
            continue
        log.info("fetch_model_download", url=url, path=str(dest))
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    return resolve_checkpoint(name)
