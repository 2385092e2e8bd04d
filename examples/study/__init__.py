"""The three-model study behind ``examples/overfitting_study.py``.

One module per step: ``data`` (loading and splitting), ``models`` (the three networks with
one shared small-image stem), ``train`` (the shared schedule), ``analysis`` (Grad-CAM maps,
their statistics, receptive fields), ``verdict`` (the stated rules), ``figures`` and
``report`` (the files written), ``run`` (the whole study into a folder).
"""
