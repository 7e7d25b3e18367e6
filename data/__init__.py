"""Datasets and tf.data input pipelines.

The catalog (``register_dataset``, ``list_datasets``, ``get_dataset``) imports no
TensorFlow; ``data.images`` and ``data.arrays`` do.
"""

from data.catalog import (
    DatasetEntry,
    check_options,
    get_dataset,
    list_datasets,
    register_dataset,
)

__all__ = ["DatasetEntry", "check_options", "get_dataset", "list_datasets", "register_dataset"]
