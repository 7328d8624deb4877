"""What a cell is: the first stage of the pipeline.

Owns the `RunSpec` (``spec``: fields, validation, the DeepSpeed config it renders from the
templates in ``ds_configs/``), the matrix of cells (``matrix``), the invariant names and the
sets cells declare (``invariant_sets``), the injected faults (``faults``), the workloads
(``workloads``: batches, losses, entropy floors), the models (``models``), the synthetic data
(``data``) and label masking (``label_mask``). A cell is data: it pickles to the ranks and
names itself in ids and reports. May import nothing of numerics outside this package
(layers: cell -> judge -> run -> show, each importing only the ones before it;
tests/test_layout.py checks).
"""
