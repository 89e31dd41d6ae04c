"""Labelled classification datasets read from an image folder, ``.npz``, ``.pt`` or CSV.

:func:`~retrofit.evaluation.datasets.load.load_dataset` finds the format from the path and the
file's first bytes, checks the data once (labels, shapes, NaN/Inf) and returns a
:class:`~retrofit.evaluation.datasets.base.ClassificationData`: a map-style torch ``Dataset`` of
``(float32 tensor, int label)`` pairs that also says how many classes there are, where the data
came from and how it was preprocessed, so the report can show it.

Anything wrong with the data raises :class:`~retrofit.errors.BadInputError` with one line that
names the file, the row or the sample index. Image folders are decoded lazily, one image per
item, so a broken image is reported (by file name) when it is first read; tensor files and CSV
are read and checked in full when loaded.

One module per job: ``load`` (format detection, the entry point), ``images`` (class folders,
Pillow), ``arrays`` (``.npz``/``.pt`` and the checks every in-memory array passes),
``csv_text`` (CSV), ``names`` (class names to indices), ``normalise`` (mean/std), ``base``
(the dataset classes), ``feeding`` (token ids or floats, once the model's input type is known),
``splits`` (train/val) and ``checks`` (labels against the model, what a model call raises).
"""
