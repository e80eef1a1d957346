"""GeneralModel: prepare corpora, pretrain, sweep and track language models on Ray.

One subpackage per stage of the flow (see docs/architecture.md): config → storage → data → … → post.
A stage imports the ones before it, never after (tests/test_layers.py holds it).
"""

from generalmodel.errors import RunFailed, UserError
from generalmodel.version import __version__

__all__ = ["RunFailed", "UserError", "__version__"]
