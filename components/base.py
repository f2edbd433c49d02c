"""The decorator every medseg component uses: the project image, no run-time installs."""

from __future__ import annotations

import functools
import os

from kfp import dsl

#: The project image (components and training); override with ``MEDSEG_IMAGE``.
IMAGE = os.environ.get("MEDSEG_IMAGE", "ghcr.io/medseg/medseg:0.1.0")

component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)
