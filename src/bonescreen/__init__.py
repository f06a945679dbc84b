"""bonescreen: opportunistic bone-health screening from chest radiographs."""

__version__ = "0.1.0"
