"""Importers and exporters: other toolkits' weights as diffuse checkpoints (`diffuse convert`) and diffuse
checkpoints as another toolkit's folder (`diffuse export`).

    convert.py         diffuse convert: the importer of each format and of each diffusers class
    diffusers_unet.py  a diffusers UNet2DModel (Ho et al.'s DDPM U-Net), and its layout, which export writes back
    diffusers_vae.py   a diffusers AutoencoderKL (the Stable Diffusion VAE family)
    taesd.py           a diffusers AutoencoderTiny (TAESD)
    adm.py             an improved-diffusion / guided-diffusion U-Net
    export.py          diffuse export: a checkpoint as a diffusers DDPMPipeline folder
    weights.py         what they share: files found and read (JSON and safetensors only: pickles are never
                       opened), --out checked before any work, the checks of a diffusers config.json, diffusers'
                       attention as ours, and the converted checkpoint written
"""
