"""Models: the :class:`Classifier` interface, students (ResNets), teachers, preprocessing, and
:func:`wrap_model` / :func:`build_model` for any torch classifier (torchvision, timm, your own)."""

from .adapter import Classifier, ClassifierProtocol, HeadAdapter
from .checkpoint import load_student, save_student
from .preprocess import Preprocess, PreprocessConfig
from .resnet import ResNet, create_model
from .teachers import TEACHERS, Teacher, load_teacher, load_teacher_checkpoint
from .wrap import IMAGENET_MEAN, IMAGENET_STD, HookedClassifier, build_model, input_channels, wrap_model

__all__ = [
    "Classifier", "ClassifierProtocol", "HeadAdapter", "HookedClassifier", "Preprocess", "PreprocessConfig",
    "ResNet", "create_model", "save_student", "load_student", "TEACHERS", "Teacher", "load_teacher",
    "load_teacher_checkpoint", "wrap_model", "build_model", "input_channels", "IMAGENET_MEAN", "IMAGENET_STD",
]
