"""Expert kinds: the adapter stack (registered first, the default) and the composed fusion expert.

Each kind's module ends with :func:`register_expert`; importing this package registers both.
"""

from clipzoo.zoo.experts import fusion, stack  # noqa: F401  (each module registers its kind)
from clipzoo.zoo.experts.base import (CONFIG_FILE, WEIGHTS_FILE, Expert, Sources, build_expert, load_expert,
                                      parse_settings)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "Expert", "Sources", "build_expert", "load_expert", "parse_settings"]
