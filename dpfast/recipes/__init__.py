"""The seed papers' recipes, one file each, over the shared parts in `dpfast.diffusion` (models,
losses, samplers, data, public data) and the engine. DPDM is `dpfast.diffusion.trainer` itself.

- `dp_mepf`: DP-MEPF (Harder et al.): one private release of mean embeddings in a public feature
  space, then a generator trained on them (post-processing).
- `dp_ldm`: DP-LDM (Lyu et al.): a public autoencoder, DP fine-tuning in its latent space.
- `dp_syngen`: DP-SynGen (Choi et al.): the coarse or cleaning stage from generated images, kept as
  a stage expert; DP-SGD on the rest.
- `dp_sad`: DP-SAD (Liu et al.): a DP teacher, then a student distilled from it against a
  discriminator, both in one DP-SGD release; every path from the private data is accounted.
"""

# the value of TrainConfig.recipe -> "module:Trainer" (imported when a run uses it)
TRAINERS = {"dpdm": "dpfast.diffusion.trainer:Trainer", "dp-mepf": "dpfast.recipes.dp_mepf:MEPFTrainer",
            # public pre-training, then private fine-tuning: the phases of dpfast.diffusion.phases over
            # the selections of dpfast.diffusion.finetune; the presets (dp-diffusion-*, dp-lora-*) pick
            # the paper's choices (init model, multiplicity, augmentations, noise levels, trainable)
            "dp-diffusion": "dpfast.diffusion.trainer:Trainer", "dp-lora": "dpfast.diffusion.trainer:Trainer",
            "pretrain": "dpfast.diffusion.trainer:Trainer", "dp-ldm": "dpfast.recipes.dp_ldm:LDMTrainer",
            "dp-syngen": "dpfast.recipes.dp_syngen:SynGenTrainer", "dp-sad": "dpfast.recipes.dp_sad:SADTrainer"}
