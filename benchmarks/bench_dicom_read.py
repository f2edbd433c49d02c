"""Reading a case from DICOM vs from NIfTI: four MR series of 155 slices each vs four .nii.gz.

At full BraTS size (240x240x155), one synthetic case (index 2: T2 numbered against its slice
order, FLAIR stored with a rescale slope and intercept) written twice, in one run:

* baseline: the NIfTI path, four ``.nii.gz`` decoded with nibabel into ``[4, X, Y, Z]``
  float32 and the affine (what the model server's NIfTI input does);
* DICOM: :func:`medseg.dicom.series.read_study` on the study folder (620 files): parse, match
  series to channels, order slices by position, apply the rescale, build the affine.

Prints the medians and the ratio DICOM / NIfTI (target: <= 2x), and checks that both give the
same image and affine.

Usage: ``python benchmarks/bench_dicom_read.py [--repeats 5] [--shape 240 240 155]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from _timing import median_time

from medseg.config import CHANNELS
from medseg.data.synth import DICOM_FLAIR_RESCALE, dicom_variant, make_case
from medseg.dicom.series import StudyInfo, read_study, write_study


def _read_nifti(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    imgs = [nib.load(f) for f in files]
    image = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])
    return image, imgs[0].affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    args = parser.parse_args()
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        v = dicom_variant(make_case(2, shape, seed=0), 2)  # type: ignore[arg-type]
        files = []
        for c, channel in enumerate(CHANNELS):
            path = root / "nifti" / f"case_{channel}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(v.image[c], v.affine), path)
            files.append(path)
        write_study(
            v.image,
            v.affine,
            root / "dicom",
            StudyInfo("BENCH"),
            v.descriptions,
            rescale={"flair": DICOM_FLAIR_RESCALE},
            reverse_instances=v.reversed_channels,
        )
        n_files = sum(1 for p in (root / "dicom").rglob("*.dcm"))
        nifti_image, nifti_affine = _read_nifti(files)
        study = read_study(root / "dicom")
        assert np.array_equal(study.image, nifti_image), "DICOM and NIfTI images differ"
        assert np.allclose(study.affine, nifti_affine, atol=1e-5), "affines differ"

        nifti_s = median_time(lambda: _read_nifti(files), args.repeats)
        dicom_s = median_time(lambda: read_study(root / "dicom"), args.repeats)
    print(f"case {shape}, 4 series, {n_files} DICOM files; median of {args.repeats}")
    print(f"  NIfTI (.nii.gz, nibabel): {nifti_s:.3f} s")
    print(f"  DICOM (read_study):       {dicom_s:.3f} s")
    print(f"  ratio DICOM / NIfTI:      {dicom_s / nifti_s:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
