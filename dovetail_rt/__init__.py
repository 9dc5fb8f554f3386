"""dovetail_rt: lossless speculative decoding with a CPU target and a GPU (or CPU) draft.

``from dovetail_rt import Client`` is the Python API. Imports are lazy so that the verifier
process can pin its threads before torch loads.
"""

__version__ = "0.1.0"
__all__ = ["Client", "DraftConfig", "LinkConfig", "SamplingParams", "VerifierConfig"]


def __getattr__(name):
    if name == "Client":
        from .client import Client

        return Client
    if name in ("DraftConfig", "LinkConfig", "VerifierConfig"):
        from . import config

        return getattr(config, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dovetail_rt' has no attribute {name!r}")
