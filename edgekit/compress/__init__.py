"""Torch-level compression passes, before quantization: each a plain function from a model to a new model.

    small = edgekit.prune(model, 0.5, data="digits")             # remove channels / neurons
    small = edgekit.sparsify(small, 0.9, data="digits", epochs=2) # exact zeros (magnitude pruning)
    small = edgekit.factorize(small, energy=0.9)                  # low-rank Linear / 1x1 conv
    small = edgekit.cluster(small, bits=4, data=split, epochs=3)  # k-means weight sharing
    small = edgekit.distill(small, model, "digits", epochs=5)     # learn from the teacher
    small = edgekit.qat(small, "digits")                          # int8-aware fine-tuning
    small, report = edgekit.run_recipe(model, "recipe.toml", "digits")
    multi = edgekit.add_exits(model, ["conv1"], "digits")      # early-exit heads (see exits.py)

The functions live in this package's modules (``prune``, ``sparsify``,
``lowrank``, ``cluster``, ``distill``, ``qat``, ``recipe``); ``edgekit``
exports them.
"""

# public name -> module of this package that defines it
API = {"prune": "prune", "sensitivity": "prune", "prunable_layers": "prune", "sparsify": "sparsify",
       "sparsity_of": "sparsify", "factorize": "lowrank", "cluster": "cluster", "distill": "distill", "qat": "qat",
       "run_recipe": "recipe", "load_recipe": "recipe", "add_exits": "exits"}
