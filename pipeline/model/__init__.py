"""The denoiser network and what drives it: conditioning, noise schedules, guidance, samplers, likelihood."""

__all__: list[str] = []
