"""Analysis of adapters and training runs; each module is imported on its own (heavy imports stay lazy).

- ``lorakit.analysis.params``: exact trainable-parameter counts from a config.
- ``lorakit.analysis.memory``: training memory by component from a config (``estimate_memory``).
- ``lorakit.analysis.activations``: the per-block inventory of saved activations behind it.
- ``lorakit.analysis.measure``: the live-tensor peak of real training steps (``measure_training_peak``).
- ``lorakit.analysis.rank``: per-layer SVD of a fine-tuning update (``analyse_rank``, ``write_rank_report``).
- ``lorakit.analysis.spectrum``: energy rank, stable rank, Eckart–Young errors, low-rank SVD via QR.
- ``lorakit.analysis.similarity``: subspace similarity φ(i, j) of two adapters (``compare_adapters``).
- model folders are read lazily by ``lorakit.models.folder``, adapter folders by ``lorakit.peft_format``.
- ``lorakit.analysis.sweep``: a package; one training run per rank and target set, tabulated (``run_sweep``).
- ``lorakit.analysis.plots``: the rank and similarity PNGs (figures from ``lorakit.figures``).
"""
