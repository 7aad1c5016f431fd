"""One training: train loop, session, device plan, TorchTrainer, Ray; imports tracking and the layers below."""
