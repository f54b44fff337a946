"""VL-Adapter: :class:`clipzoo.zoo.adapters.vit_adapter.module.ViTAdapter` on both towers (its config's ``towers``)."""

from clipzoo.zoo.adapters.vit_adapter.module import ViTAdapter


class VLAdapter(ViTAdapter):
    """Bottleneck adapters in the image and the text transformer's blocks."""
