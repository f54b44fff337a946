"""VL-Adapter (Sung et al., 2022): bottleneck adapters in both towers' blocks."""

from clipzoo.zoo.adapters.base import register_adapter
from clipzoo.zoo.adapters.vl_adapter.config import VLAdapterConfig
from clipzoo.zoo.adapters.vl_adapter.module import VLAdapter

register_adapter("vl-adapter", VLAdapterConfig, VLAdapter)
