"""selfalign: fast and accurate image-text retrieval with independent encoders and SelfAlign alignment.

>>> from selfalign import load_model
>>> model, cfg = load_model("runs/scenes-selfalign")
>>> text = model.encode_text(model.tokenize(["two red circles"])).embedding      # [1, E]
"""

__version__ = "0.1.0"

from selfalign.model.checkpoint import load_model  # noqa: E402
from selfalign.model.model import Encoded, RetrievalModel  # noqa: E402

__all__ = ["load_model", "RetrievalModel", "Encoded", "__version__"]
