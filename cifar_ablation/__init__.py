"""cifar-ablation: ablation studies of CNN generalization tricks on CIFAR-10 (Hydra + PyTorch + MLflow)."""
from .resolvers import register_resolvers

register_resolvers()
