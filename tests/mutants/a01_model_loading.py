"""Mutants of assignment 01 (``load_pipeline``); format in ``tests/mutants/__init__.py``.

Not here because the CPU cannot tell them apart from a correct answer (the battery catches them on CUDA):
``alphas_cumprod`` left on the CPU, the pipeline never moved (``.to(device)`` forgotten), the dtype chosen from
``torch.cuda.is_available()`` instead of ``device``. The small model ships without a safety checker, so
forgetting ``safety_checker=None`` is not detectable on it either.
"""

_HEADER = "from diffusers import DDIMScheduler, StableDiffusionPipeline\n\n\n"


def _cell(body: str, header: str = _HEADER) -> str:
    return header + "def load_pipeline(model_id, device):\n" + body


WRONG = {
    "load_pipeline": {
        "fp16 on every device": _cell("""\
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "default (leading) timestep spacing": _cell("""\
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "linspace timestep spacing": _cell("""\
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "DDIM with default betas instead of the model's config": _cell("""\
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None)
    pipe.scheduler = DDIMScheduler(timestep_spacing="trailing")
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "deprecated torch_dtype keyword": _cell("""\
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "scheduler never swapped": _cell("""\
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None)
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "LCM scheduler instead of DDIM": _cell("""\
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe = pipe.to(device)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
""", header="from diffusers import LCMScheduler, StableDiffusionPipeline\n\n\n"),
        "device hard-coded to cuda (the 2024 notebook)": _cell("""\
    pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=torch.float16, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe = pipe.to("cuda")
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.cuda()
    return pipe
"""),
    },
}

CORRECT = {
    "load_pipeline": {
        "load in fp32, then cast with pipe.to(device, dtype)": _cell("""\
    is_cuda = str(device).startswith("cuda")
    pipe = StableDiffusionPipeline.from_pretrained(model_id, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=torch.float16 if is_cuda else torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device)
    return pipe
"""),
        "scheduler loaded from the model's subfolder and passed in": _cell("""\
    device = torch.device(device)
    scheduler = DDIMScheduler.from_pretrained(model_id, subfolder="scheduler", timestep_spacing="trailing")
    pipe = StableDiffusionPipeline.from_pretrained(
        model_id, scheduler=scheduler, safety_checker=None, requires_safety_checker=False,
        dtype=torch.float16 if device.type == "cuda" else torch.float32,
    ).to(device)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return pipe
"""),
    },
}
