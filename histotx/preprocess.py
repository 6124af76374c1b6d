"""How HistoTx makes a model's input image, in one place: the normalisation and the resize.

ImageNet's per-channel RGB mean and std (of pixels in [0, 1]) are the normalisation of most image backbones
the field starts from (timm's and torchvision's ImageNet weights, UNI) and HistoTx's default. A tile (or
crop) is resized to the model's input by antialiased bilinear interpolation: training
(:mod:`histotx.data.augment`), `histotx embed`/`predict`, and what the exports declare (Hugging Face
preprocessor_config.json ``resample``, timm pretrained_cfg ``interpolation``) all read it here, so a user
of an export preprocesses as the model was trained. Light (no imports): the data side, the model side and
the exports may all depend on it.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODE = "bilinear"
RESIZE_ANTIALIAS = True  # torch's antialiased bilinear = PIL's BILINEAR filter when shrinking
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}[RESIZE_MODE]  # PIL.Image.Resampling value (Hugging Face's key)
TIMM_INTERPOLATION = RESIZE_MODE
