"""Skin-lesion classification (HAM10000 / ISIC 2018 Task 3): the second task family's data.

* :mod:`medseg.skin.classes`: the seven diagnoses and HAM10000's class frequencies;
* :mod:`medseg.skin.synth`: synthetic dermoscopy-like images in the HAM10000 layout;
* :mod:`medseg.skin.layouts`: the public layouts (HAM10000, ISIC 2018 Task 3, folder per class);
* :mod:`medseg.skin.images`: bounded decoding of JPEG/PNG bytes (server and ingest), and the
  pixel-only PNG re-encoding that de-identifies;
* :mod:`medseg.skin.validate`: checking and de-identifying one image on its way into a dataset;
* :mod:`medseg.skin.metrics`: ROC AUC, balanced accuracy, sensitivity/specificity, calibration.
"""
