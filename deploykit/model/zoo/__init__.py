"""The built-in model zoo: one module per family, its configs and data beside it.

Each module registers its models with `deploykit.model.spec.register_model`; importing this package fills
the registry. Weights are random (seeded) unless a model can be trained quickly on local data: the
LeNets on the UCI handwritten digits (shipped beside them), and the `*-trained` variants of the study
models (`gpt2-tiny-trained`, `gpt2-mini-trained` on the Python language reference Python ships;
`mlp-sst2-trained`, `textclf-agnews-small-trained`, `seq2seq-transformer-small-trained`,
`espnet-st-small-trained` on generated tasks, `synthetic`). Trained weights are cached under
~/.cache/deploykit with the recipe and the trained model's quality, which exports record.
"""

from . import espnet_st, gpt2, lenet, mlp, resnet, text, vae  # noqa: F401
