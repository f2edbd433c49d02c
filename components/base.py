"""The decorator every medseg component uses: the project image, no run-time installs."""

from __future__ import annotations

import functools

from kfp import dsl

from medseg.core.settings import PlatformSettings

#: The project image (components and training): ``MEDSEG_IMAGES__PROJECT`` overrides the default.
IMAGE = PlatformSettings().images.project

component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)
