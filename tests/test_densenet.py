"""DenseNet-161, the weakly supervised baseline (mae_jax/models/densenet.py), vs torchvision."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mae_jax.models import densenet, mae

# torchvision.models.densenet161(num_classes=1000).named_parameters() (= its state_dict without
# the BatchNorm buffers), in order, as "name dims"; generated from torchvision's DenseNet
# definition with the stem conv's input channels 3 -> 6. Its 3-channel total is torchvision's
# 28,681,000 (DenseNet161_Weights.IMAGENET1K_V1.meta["num_params"]).
TORCHVISION_DENSENET161 = """
features.conv0.weight 96,6,7,7
features.norm0.weight 96
features.norm0.bias 96
features.denseblock1.denselayer1.norm1.weight 96
features.denseblock1.denselayer1.norm1.bias 96
features.denseblock1.denselayer1.conv1.weight 192,96,1,1
features.denseblock1.denselayer1.norm2.weight 192
features.denseblock1.denselayer1.norm2.bias 192
features.denseblock1.denselayer1.conv2.weight 48,192,3,3
features.denseblock1.denselayer2.norm1.weight 144
features.denseblock1.denselayer2.norm1.bias 144
features.denseblock1.denselayer2.conv1.weight 192,144,1,1
features.denseblock1.denselayer2.norm2.weight 192
features.denseblock1.denselayer2.norm2.bias 192
features.denseblock1.denselayer2.conv2.weight 48,192,3,3
features.denseblock1.denselayer3.norm1.weight 192
features.denseblock1.denselayer3.norm1.bias 192
features.denseblock1.denselayer3.conv1.weight 192,192,1,1
features.denseblock1.denselayer3.norm2.weight 192
features.denseblock1.denselayer3.norm2.bias 192
features.denseblock1.denselayer3.conv2.weight 48,192,3,3
features.denseblock1.denselayer4.norm1.weight 240
features.denseblock1.denselayer4.norm1.bias 240
features.denseblock1.denselayer4.conv1.weight 192,240,1,1
features.denseblock1.denselayer4.norm2.weight 192
features.denseblock1.denselayer4.norm2.bias 192
features.denseblock1.denselayer4.conv2.weight 48,192,3,3
features.denseblock1.denselayer5.norm1.weight 288
features.denseblock1.denselayer5.norm1.bias 288
features.denseblock1.denselayer5.conv1.weight 192,288,1,1
features.denseblock1.denselayer5.norm2.weight 192
features.denseblock1.denselayer5.norm2.bias 192
features.denseblock1.denselayer5.conv2.weight 48,192,3,3
features.denseblock1.denselayer6.norm1.weight 336
features.denseblock1.denselayer6.norm1.bias 336
features.denseblock1.denselayer6.conv1.weight 192,336,1,1
features.denseblock1.denselayer6.norm2.weight 192
features.denseblock1.denselayer6.norm2.bias 192
features.denseblock1.denselayer6.conv2.weight 48,192,3,3
features.transition1.norm.weight 384
features.transition1.norm.bias 384
features.transition1.conv.weight 192,384,1,1
features.denseblock2.denselayer1.norm1.weight 192
features.denseblock2.denselayer1.norm1.bias 192
features.denseblock2.denselayer1.conv1.weight 192,192,1,1
features.denseblock2.denselayer1.norm2.weight 192
features.denseblock2.denselayer1.norm2.bias 192
features.denseblock2.denselayer1.conv2.weight 48,192,3,3
features.denseblock2.denselayer2.norm1.weight 240
features.denseblock2.denselayer2.norm1.bias 240
features.denseblock2.denselayer2.conv1.weight 192,240,1,1
features.denseblock2.denselayer2.norm2.weight 192
features.denseblock2.denselayer2.norm2.bias 192
features.denseblock2.denselayer2.conv2.weight 48,192,3,3
features.denseblock2.denselayer3.norm1.weight 288
features.denseblock2.denselayer3.norm1.bias 288
features.denseblock2.denselayer3.conv1.weight 192,288,1,1
features.denseblock2.denselayer3.norm2.weight 192
features.denseblock2.denselayer3.norm2.bias 192
features.denseblock2.denselayer3.conv2.weight 48,192,3,3
features.denseblock2.denselayer4.norm1.weight 336
features.denseblock2.denselayer4.norm1.bias 336
features.denseblock2.denselayer4.conv1.weight 192,336,1,1
features.denseblock2.denselayer4.norm2.weight 192
features.denseblock2.denselayer4.norm2.bias 192
features.denseblock2.denselayer4.conv2.weight 48,192,3,3
features.denseblock2.denselayer5.norm1.weight 384
features.denseblock2.denselayer5.norm1.bias 384
features.denseblock2.denselayer5.conv1.weight 192,384,1,1
features.denseblock2.denselayer5.norm2.weight 192
features.denseblock2.denselayer5.norm2.bias 192
features.denseblock2.denselayer5.conv2.weight 48,192,3,3
features.denseblock2.denselayer6.norm1.weight 432
features.denseblock2.denselayer6.norm1.bias 432
features.denseblock2.denselayer6.conv1.weight 192,432,1,1
features.denseblock2.denselayer6.norm2.weight 192
features.denseblock2.denselayer6.norm2.bias 192
features.denseblock2.denselayer6.conv2.weight 48,192,3,3
features.denseblock2.denselayer7.norm1.weight 480
features.denseblock2.denselayer7.norm1.bias 480
features.denseblock2.denselayer7.conv1.weight 192,480,1,1
features.denseblock2.denselayer7.norm2.weight 192
features.denseblock2.denselayer7.norm2.bias 192
features.denseblock2.denselayer7.conv2.weight 48,192,3,3
features.denseblock2.denselayer8.norm1.weight 528
features.denseblock2.denselayer8.norm1.bias 528
features.denseblock2.denselayer8.conv1.weight 192,528,1,1
features.denseblock2.denselayer8.norm2.weight 192
features.denseblock2.denselayer8.norm2.bias 192
features.denseblock2.denselayer8.conv2.weight 48,192,3,3
features.denseblock2.denselayer9.norm1.weight 576
features.denseblock2.denselayer9.norm1.bias 576
features.denseblock2.denselayer9.conv1.weight 192,576,1,1
features.denseblock2.denselayer9.norm2.weight 192
features.denseblock2.denselayer9.norm2.bias 192
features.denseblock2.denselayer9.conv2.weight 48,192,3,3
features.denseblock2.denselayer10.norm1.weight 624
features.denseblock2.denselayer10.norm1.bias 624
features.denseblock2.denselayer10.conv1.weight 192,624,1,1
features.denseblock2.denselayer10.norm2.weight 192
features.denseblock2.denselayer10.norm2.bias 192
features.denseblock2.denselayer10.conv2.weight 48,192,3,3
features.denseblock2.denselayer11.norm1.weight 672
features.denseblock2.denselayer11.norm1.bias 672
features.denseblock2.denselayer11.conv1.weight 192,672,1,1
features.denseblock2.denselayer11.norm2.weight 192
features.denseblock2.denselayer11.norm2.bias 192
features.denseblock2.denselayer11.conv2.weight 48,192,3,3
features.denseblock2.denselayer12.norm1.weight 720
features.denseblock2.denselayer12.norm1.bias 720
features.denseblock2.denselayer12.conv1.weight 192,720,1,1
features.denseblock2.denselayer12.norm2.weight 192
features.denseblock2.denselayer12.norm2.bias 192
features.denseblock2.denselayer12.conv2.weight 48,192,3,3
features.transition2.norm.weight 768
features.transition2.norm.bias 768
features.transition2.conv.weight 384,768,1,1
features.denseblock3.denselayer1.norm1.weight 384
features.denseblock3.denselayer1.norm1.bias 384
features.denseblock3.denselayer1.conv1.weight 192,384,1,1
features.denseblock3.denselayer1.norm2.weight 192
features.denseblock3.denselayer1.norm2.bias 192
features.denseblock3.denselayer1.conv2.weight 48,192,3,3
features.denseblock3.denselayer2.norm1.weight 432
features.denseblock3.denselayer2.norm1.bias 432
features.denseblock3.denselayer2.conv1.weight 192,432,1,1
features.denseblock3.denselayer2.norm2.weight 192
features.denseblock3.denselayer2.norm2.bias 192
features.denseblock3.denselayer2.conv2.weight 48,192,3,3
features.denseblock3.denselayer3.norm1.weight 480
features.denseblock3.denselayer3.norm1.bias 480
features.denseblock3.denselayer3.conv1.weight 192,480,1,1
features.denseblock3.denselayer3.norm2.weight 192
features.denseblock3.denselayer3.norm2.bias 192
features.denseblock3.denselayer3.conv2.weight 48,192,3,3
features.denseblock3.denselayer4.norm1.weight 528
features.denseblock3.denselayer4.norm1.bias 528
features.denseblock3.denselayer4.conv1.weight 192,528,1,1
features.denseblock3.denselayer4.norm2.weight 192
features.denseblock3.denselayer4.norm2.bias 192
features.denseblock3.denselayer4.conv2.weight 48,192,3,3
features.denseblock3.denselayer5.norm1.weight 576
features.denseblock3.denselayer5.norm1.bias 576
features.denseblock3.denselayer5.conv1.weight 192,576,1,1
features.denseblock3.denselayer5.norm2.weight 192
features.denseblock3.denselayer5.norm2.bias 192
features.denseblock3.denselayer5.conv2.weight 48,192,3,3
features.denseblock3.denselayer6.norm1.weight 624
features.denseblock3.denselayer6.norm1.bias 624
features.denseblock3.denselayer6.conv1.weight 192,624,1,1
features.denseblock3.denselayer6.norm2.weight 192
features.denseblock3.denselayer6.norm2.bias 192
features.denseblock3.denselayer6.conv2.weight 48,192,3,3
features.denseblock3.denselayer7.norm1.weight 672
features.denseblock3.denselayer7.norm1.bias 672
features.denseblock3.denselayer7.conv1.weight 192,672,1,1
features.denseblock3.denselayer7.norm2.weight 192
features.denseblock3.denselayer7.norm2.bias 192
features.denseblock3.denselayer7.conv2.weight 48,192,3,3
features.denseblock3.denselayer8.norm1.weight 720
features.denseblock3.denselayer8.norm1.bias 720
features.denseblock3.denselayer8.conv1.weight 192,720,1,1
features.denseblock3.denselayer8.norm2.weight 192
features.denseblock3.denselayer8.norm2.bias 192
features.denseblock3.denselayer8.conv2.weight 48,192,3,3
features.denseblock3.denselayer9.norm1.weight 768
features.denseblock3.denselayer9.norm1.bias 768
features.denseblock3.denselayer9.conv1.weight 192,768,1,1
features.denseblock3.denselayer9.norm2.weight 192
features.denseblock3.denselayer9.norm2.bias 192
features.denseblock3.denselayer9.conv2.weight 48,192,3,3
features.denseblock3.denselayer10.norm1.weight 816
features.denseblock3.denselayer10.norm1.bias 816
features.denseblock3.denselayer10.conv1.weight 192,816,1,1
features.denseblock3.denselayer10.norm2.weight 192
features.denseblock3.denselayer10.norm2.bias 192
features.denseblock3.denselayer10.conv2.weight 48,192,3,3
features.denseblock3.denselayer11.norm1.weight 864
features.denseblock3.denselayer11.norm1.bias 864
features.denseblock3.denselayer11.conv1.weight 192,864,1,1
features.denseblock3.denselayer11.norm2.weight 192
features.denseblock3.denselayer11.norm2.bias 192
features.denseblock3.denselayer11.conv2.weight 48,192,3,3
features.denseblock3.denselayer12.norm1.weight 912
features.denseblock3.denselayer12.norm1.bias 912
features.denseblock3.denselayer12.conv1.weight 192,912,1,1
features.denseblock3.denselayer12.norm2.weight 192
features.denseblock3.denselayer12.norm2.bias 192
features.denseblock3.denselayer12.conv2.weight 48,192,3,3
features.denseblock3.denselayer13.norm1.weight 960
features.denseblock3.denselayer13.norm1.bias 960
features.denseblock3.denselayer13.conv1.weight 192,960,1,1
features.denseblock3.denselayer13.norm2.weight 192
features.denseblock3.denselayer13.norm2.bias 192
features.denseblock3.denselayer13.conv2.weight 48,192,3,3
features.denseblock3.denselayer14.norm1.weight 1008
features.denseblock3.denselayer14.norm1.bias 1008
features.denseblock3.denselayer14.conv1.weight 192,1008,1,1
features.denseblock3.denselayer14.norm2.weight 192
features.denseblock3.denselayer14.norm2.bias 192
features.denseblock3.denselayer14.conv2.weight 48,192,3,3
features.denseblock3.denselayer15.norm1.weight 1056
features.denseblock3.denselayer15.norm1.bias 1056
features.denseblock3.denselayer15.conv1.weight 192,1056,1,1
features.denseblock3.denselayer15.norm2.weight 192
features.denseblock3.denselayer15.norm2.bias 192
features.denseblock3.denselayer15.conv2.weight 48,192,3,3
features.denseblock3.denselayer16.norm1.weight 1104
features.denseblock3.denselayer16.norm1.bias 1104
features.denseblock3.denselayer16.conv1.weight 192,1104,1,1
features.denseblock3.denselayer16.norm2.weight 192
features.denseblock3.denselayer16.norm2.bias 192
features.denseblock3.denselayer16.conv2.weight 48,192,3,3
features.denseblock3.denselayer17.norm1.weight 1152
features.denseblock3.denselayer17.norm1.bias 1152
features.denseblock3.denselayer17.conv1.weight 192,1152,1,1
features.denseblock3.denselayer17.norm2.weight 192
features.denseblock3.denselayer17.norm2.bias 192
features.denseblock3.denselayer17.conv2.weight 48,192,3,3
features.denseblock3.denselayer18.norm1.weight 1200
features.denseblock3.denselayer18.norm1.bias 1200
features.denseblock3.denselayer18.conv1.weight 192,1200,1,1
features.denseblock3.denselayer18.norm2.weight 192
features.denseblock3.denselayer18.norm2.bias 192
features.denseblock3.denselayer18.conv2.weight 48,192,3,3
features.denseblock3.denselayer19.norm1.weight 1248
features.denseblock3.denselayer19.norm1.bias 1248
features.denseblock3.denselayer19.conv1.weight 192,1248,1,1
features.denseblock3.denselayer19.norm2.weight 192
features.denseblock3.denselayer19.norm2.bias 192
features.denseblock3.denselayer19.conv2.weight 48,192,3,3
features.denseblock3.denselayer20.norm1.weight 1296
features.denseblock3.denselayer20.norm1.bias 1296
features.denseblock3.denselayer20.conv1.weight 192,1296,1,1
features.denseblock3.denselayer20.norm2.weight 192
features.denseblock3.denselayer20.norm2.bias 192
features.denseblock3.denselayer20.conv2.weight 48,192,3,3
features.denseblock3.denselayer21.norm1.weight 1344
features.denseblock3.denselayer21.norm1.bias 1344
features.denseblock3.denselayer21.conv1.weight 192,1344,1,1
features.denseblock3.denselayer21.norm2.weight 192
features.denseblock3.denselayer21.norm2.bias 192
features.denseblock3.denselayer21.conv2.weight 48,192,3,3
features.denseblock3.denselayer22.norm1.weight 1392
features.denseblock3.denselayer22.norm1.bias 1392
features.denseblock3.denselayer22.conv1.weight 192,1392,1,1
features.denseblock3.denselayer22.norm2.weight 192
features.denseblock3.denselayer22.norm2.bias 192
features.denseblock3.denselayer22.conv2.weight 48,192,3,3
features.denseblock3.denselayer23.norm1.weight 1440
features.denseblock3.denselayer23.norm1.bias 1440
features.denseblock3.denselayer23.conv1.weight 192,1440,1,1
features.denseblock3.denselayer23.norm2.weight 192
features.denseblock3.denselayer23.norm2.bias 192
features.denseblock3.denselayer23.conv2.weight 48,192,3,3
features.denseblock3.denselayer24.norm1.weight 1488
features.denseblock3.denselayer24.norm1.bias 1488
features.denseblock3.denselayer24.conv1.weight 192,1488,1,1
features.denseblock3.denselayer24.norm2.weight 192
features.denseblock3.denselayer24.norm2.bias 192
features.denseblock3.denselayer24.conv2.weight 48,192,3,3
features.denseblock3.denselayer25.norm1.weight 1536
features.denseblock3.denselayer25.norm1.bias 1536
features.denseblock3.denselayer25.conv1.weight 192,1536,1,1
features.denseblock3.denselayer25.norm2.weight 192
features.denseblock3.denselayer25.norm2.bias 192
features.denseblock3.denselayer25.conv2.weight 48,192,3,3
features.denseblock3.denselayer26.norm1.weight 1584
features.denseblock3.denselayer26.norm1.bias 1584
features.denseblock3.denselayer26.conv1.weight 192,1584,1,1
features.denseblock3.denselayer26.norm2.weight 192
features.denseblock3.denselayer26.norm2.bias 192
features.denseblock3.denselayer26.conv2.weight 48,192,3,3
features.denseblock3.denselayer27.norm1.weight 1632
features.denseblock3.denselayer27.norm1.bias 1632
features.denseblock3.denselayer27.conv1.weight 192,1632,1,1
features.denseblock3.denselayer27.norm2.weight 192
features.denseblock3.denselayer27.norm2.bias 192
features.denseblock3.denselayer27.conv2.weight 48,192,3,3
features.denseblock3.denselayer28.norm1.weight 1680
features.denseblock3.denselayer28.norm1.bias 1680
features.denseblock3.denselayer28.conv1.weight 192,1680,1,1
features.denseblock3.denselayer28.norm2.weight 192
features.denseblock3.denselayer28.norm2.bias 192
features.denseblock3.denselayer28.conv2.weight 48,192,3,3
features.denseblock3.denselayer29.norm1.weight 1728
features.denseblock3.denselayer29.norm1.bias 1728
features.denseblock3.denselayer29.conv1.weight 192,1728,1,1
features.denseblock3.denselayer29.norm2.weight 192
features.denseblock3.denselayer29.norm2.bias 192
features.denseblock3.denselayer29.conv2.weight 48,192,3,3
features.denseblock3.denselayer30.norm1.weight 1776
features.denseblock3.denselayer30.norm1.bias 1776
features.denseblock3.denselayer30.conv1.weight 192,1776,1,1
features.denseblock3.denselayer30.norm2.weight 192
features.denseblock3.denselayer30.norm2.bias 192
features.denseblock3.denselayer30.conv2.weight 48,192,3,3
features.denseblock3.denselayer31.norm1.weight 1824
features.denseblock3.denselayer31.norm1.bias 1824
features.denseblock3.denselayer31.conv1.weight 192,1824,1,1
features.denseblock3.denselayer31.norm2.weight 192
features.denseblock3.denselayer31.norm2.bias 192
features.denseblock3.denselayer31.conv2.weight 48,192,3,3
features.denseblock3.denselayer32.norm1.weight 1872
features.denseblock3.denselayer32.norm1.bias 1872
features.denseblock3.denselayer32.conv1.weight 192,1872,1,1
features.denseblock3.denselayer32.norm2.weight 192
features.denseblock3.denselayer32.norm2.bias 192
features.denseblock3.denselayer32.conv2.weight 48,192,3,3
features.denseblock3.denselayer33.norm1.weight 1920
features.denseblock3.denselayer33.norm1.bias 1920
features.denseblock3.denselayer33.conv1.weight 192,1920,1,1
features.denseblock3.denselayer33.norm2.weight 192
features.denseblock3.denselayer33.norm2.bias 192
features.denseblock3.denselayer33.conv2.weight 48,192,3,3
features.denseblock3.denselayer34.norm1.weight 1968
features.denseblock3.denselayer34.norm1.bias 1968
features.denseblock3.denselayer34.conv1.weight 192,1968,1,1
features.denseblock3.denselayer34.norm2.weight 192
features.denseblock3.denselayer34.norm2.bias 192
features.denseblock3.denselayer34.conv2.weight 48,192,3,3
features.denseblock3.denselayer35.norm1.weight 2016
features.denseblock3.denselayer35.norm1.bias 2016
features.denseblock3.denselayer35.conv1.weight 192,2016,1,1
features.denseblock3.denselayer35.norm2.weight 192
features.denseblock3.denselayer35.norm2.bias 192
features.denseblock3.denselayer35.conv2.weight 48,192,3,3
features.denseblock3.denselayer36.norm1.weight 2064
features.denseblock3.denselayer36.norm1.bias 2064
features.denseblock3.denselayer36.conv1.weight 192,2064,1,1
features.denseblock3.denselayer36.norm2.weight 192
features.denseblock3.denselayer36.norm2.bias 192
features.denseblock3.denselayer36.conv2.weight 48,192,3,3
features.transition3.norm.weight 2112
features.transition3.norm.bias 2112
features.transition3.conv.weight 1056,2112,1,1
features.denseblock4.denselayer1.norm1.weight 1056
features.denseblock4.denselayer1.norm1.bias 1056
features.denseblock4.denselayer1.conv1.weight 192,1056,1,1
features.denseblock4.denselayer1.norm2.weight 192
features.denseblock4.denselayer1.norm2.bias 192
features.denseblock4.denselayer1.conv2.weight 48,192,3,3
features.denseblock4.denselayer2.norm1.weight 1104
features.denseblock4.denselayer2.norm1.bias 1104
features.denseblock4.denselayer2.conv1.weight 192,1104,1,1
features.denseblock4.denselayer2.norm2.weight 192
features.denseblock4.denselayer2.norm2.bias 192
features.denseblock4.denselayer2.conv2.weight 48,192,3,3
features.denseblock4.denselayer3.norm1.weight 1152
features.denseblock4.denselayer3.norm1.bias 1152
features.denseblock4.denselayer3.conv1.weight 192,1152,1,1
features.denseblock4.denselayer3.norm2.weight 192
features.denseblock4.denselayer3.norm2.bias 192
features.denseblock4.denselayer3.conv2.weight 48,192,3,3
features.denseblock4.denselayer4.norm1.weight 1200
features.denseblock4.denselayer4.norm1.bias 1200
features.denseblock4.denselayer4.conv1.weight 192,1200,1,1
features.denseblock4.denselayer4.norm2.weight 192
features.denseblock4.denselayer4.norm2.bias 192
features.denseblock4.denselayer4.conv2.weight 48,192,3,3
features.denseblock4.denselayer5.norm1.weight 1248
features.denseblock4.denselayer5.norm1.bias 1248
features.denseblock4.denselayer5.conv1.weight 192,1248,1,1
features.denseblock4.denselayer5.norm2.weight 192
features.denseblock4.denselayer5.norm2.bias 192
features.denseblock4.denselayer5.conv2.weight 48,192,3,3
features.denseblock4.denselayer6.norm1.weight 1296
features.denseblock4.denselayer6.norm1.bias 1296
features.denseblock4.denselayer6.conv1.weight 192,1296,1,1
features.denseblock4.denselayer6.norm2.weight 192
features.denseblock4.denselayer6.norm2.bias 192
features.denseblock4.denselayer6.conv2.weight 48,192,3,3
features.denseblock4.denselayer7.norm1.weight 1344
features.denseblock4.denselayer7.norm1.bias 1344
features.denseblock4.denselayer7.conv1.weight 192,1344,1,1
features.denseblock4.denselayer7.norm2.weight 192
features.denseblock4.denselayer7.norm2.bias 192
features.denseblock4.denselayer7.conv2.weight 48,192,3,3
features.denseblock4.denselayer8.norm1.weight 1392
features.denseblock4.denselayer8.norm1.bias 1392
features.denseblock4.denselayer8.conv1.weight 192,1392,1,1
features.denseblock4.denselayer8.norm2.weight 192
features.denseblock4.denselayer8.norm2.bias 192
features.denseblock4.denselayer8.conv2.weight 48,192,3,3
features.denseblock4.denselayer9.norm1.weight 1440
features.denseblock4.denselayer9.norm1.bias 1440
features.denseblock4.denselayer9.conv1.weight 192,1440,1,1
features.denseblock4.denselayer9.norm2.weight 192
features.denseblock4.denselayer9.norm2.bias 192
features.denseblock4.denselayer9.conv2.weight 48,192,3,3
features.denseblock4.denselayer10.norm1.weight 1488
features.denseblock4.denselayer10.norm1.bias 1488
features.denseblock4.denselayer10.conv1.weight 192,1488,1,1
features.denseblock4.denselayer10.norm2.weight 192
features.denseblock4.denselayer10.norm2.bias 192
features.denseblock4.denselayer10.conv2.weight 48,192,3,3
features.denseblock4.denselayer11.norm1.weight 1536
features.denseblock4.denselayer11.norm1.bias 1536
features.denseblock4.denselayer11.conv1.weight 192,1536,1,1
features.denseblock4.denselayer11.norm2.weight 192
features.denseblock4.denselayer11.norm2.bias 192
features.denseblock4.denselayer11.conv2.weight 48,192,3,3
features.denseblock4.denselayer12.norm1.weight 1584
features.denseblock4.denselayer12.norm1.bias 1584
features.denseblock4.denselayer12.conv1.weight 192,1584,1,1
features.denseblock4.denselayer12.norm2.weight 192
features.denseblock4.denselayer12.norm2.bias 192
features.denseblock4.denselayer12.conv2.weight 48,192,3,3
features.denseblock4.denselayer13.norm1.weight 1632
features.denseblock4.denselayer13.norm1.bias 1632
features.denseblock4.denselayer13.conv1.weight 192,1632,1,1
features.denseblock4.denselayer13.norm2.weight 192
features.denseblock4.denselayer13.norm2.bias 192
features.denseblock4.denselayer13.conv2.weight 48,192,3,3
features.denseblock4.denselayer14.norm1.weight 1680
features.denseblock4.denselayer14.norm1.bias 1680
features.denseblock4.denselayer14.conv1.weight 192,1680,1,1
features.denseblock4.denselayer14.norm2.weight 192
features.denseblock4.denselayer14.norm2.bias 192
features.denseblock4.denselayer14.conv2.weight 48,192,3,3
features.denseblock4.denselayer15.norm1.weight 1728
features.denseblock4.denselayer15.norm1.bias 1728
features.denseblock4.denselayer15.conv1.weight 192,1728,1,1
features.denseblock4.denselayer15.norm2.weight 192
features.denseblock4.denselayer15.norm2.bias 192
features.denseblock4.denselayer15.conv2.weight 48,192,3,3
features.denseblock4.denselayer16.norm1.weight 1776
features.denseblock4.denselayer16.norm1.bias 1776
features.denseblock4.denselayer16.conv1.weight 192,1776,1,1
features.denseblock4.denselayer16.norm2.weight 192
features.denseblock4.denselayer16.norm2.bias 192
features.denseblock4.denselayer16.conv2.weight 48,192,3,3
features.denseblock4.denselayer17.norm1.weight 1824
features.denseblock4.denselayer17.norm1.bias 1824
features.denseblock4.denselayer17.conv1.weight 192,1824,1,1
features.denseblock4.denselayer17.norm2.weight 192
features.denseblock4.denselayer17.norm2.bias 192
features.denseblock4.denselayer17.conv2.weight 48,192,3,3
features.denseblock4.denselayer18.norm1.weight 1872
features.denseblock4.denselayer18.norm1.bias 1872
features.denseblock4.denselayer18.conv1.weight 192,1872,1,1
features.denseblock4.denselayer18.norm2.weight 192
features.denseblock4.denselayer18.norm2.bias 192
features.denseblock4.denselayer18.conv2.weight 48,192,3,3
features.denseblock4.denselayer19.norm1.weight 1920
features.denseblock4.denselayer19.norm1.bias 1920
features.denseblock4.denselayer19.conv1.weight 192,1920,1,1
features.denseblock4.denselayer19.norm2.weight 192
features.denseblock4.denselayer19.norm2.bias 192
features.denseblock4.denselayer19.conv2.weight 48,192,3,3
features.denseblock4.denselayer20.norm1.weight 1968
features.denseblock4.denselayer20.norm1.bias 1968
features.denseblock4.denselayer20.conv1.weight 192,1968,1,1
features.denseblock4.denselayer20.norm2.weight 192
features.denseblock4.denselayer20.norm2.bias 192
features.denseblock4.denselayer20.conv2.weight 48,192,3,3
features.denseblock4.denselayer21.norm1.weight 2016
features.denseblock4.denselayer21.norm1.bias 2016
features.denseblock4.denselayer21.conv1.weight 192,2016,1,1
features.denseblock4.denselayer21.norm2.weight 192
features.denseblock4.denselayer21.norm2.bias 192
features.denseblock4.denselayer21.conv2.weight 48,192,3,3
features.denseblock4.denselayer22.norm1.weight 2064
features.denseblock4.denselayer22.norm1.bias 2064
features.denseblock4.denselayer22.conv1.weight 192,2064,1,1
features.denseblock4.denselayer22.norm2.weight 192
features.denseblock4.denselayer22.norm2.bias 192
features.denseblock4.denselayer22.conv2.weight 48,192,3,3
features.denseblock4.denselayer23.norm1.weight 2112
features.denseblock4.denselayer23.norm1.bias 2112
features.denseblock4.denselayer23.conv1.weight 192,2112,1,1
features.denseblock4.denselayer23.norm2.weight 192
features.denseblock4.denselayer23.norm2.bias 192
features.denseblock4.denselayer23.conv2.weight 48,192,3,3
features.denseblock4.denselayer24.norm1.weight 2160
features.denseblock4.denselayer24.norm1.bias 2160
features.denseblock4.denselayer24.conv1.weight 192,2160,1,1
features.denseblock4.denselayer24.norm2.weight 192
features.denseblock4.denselayer24.norm2.bias 192
features.denseblock4.denselayer24.conv2.weight 48,192,3,3
features.norm5.weight 2208
features.norm5.bias 2208
classifier.weight 1000,2208
classifier.bias 1000
"""
FEATURES, FEATURE_DIM = 26_486_112, 2208


def densenet161_cfg(**kw):
  return ml_collections.ConfigDict({**dict(
      channels=6, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, bn_size=4,
      num_classes=1000, image_size=256, label_smoothing=0.0), **kw})


def tiny_cfg(**kw):
  return densenet161_cfg(**{**dict(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                   num_classes=5, image_size=32), **kw})


def build(cfg, abstract=False):
  with nnx.use_eager_sharding(False):
    make = lambda: densenet.DenseNetWSL(cfg, rngs=nnx.Rngs(0))
    return nnx.eval_shape(make) if abstract else make()


def ours(name):
  """torchvision parameter name -> our NNX state path."""
  *mods, leaf = name.split(".")
  if mods == ["classifier"]:
    return ("classifier",) if leaf == "weight" else ("classifier_bias",)
  assert mods[0] == "features", name
  path = []
  for m in mods[1:]:
    if m.startswith("denseblock"):
      path += ["blocks", int(m[len("denseblock"):]) - 1]
    elif m.startswith("denselayer"):
      path.append(int(m[len("denselayer"):]) - 1)
    elif m.startswith("transition"):
      path += ["transitions", int(m[len("transition"):]) - 1]
    else:
      path.append(m)
  is_norm = "norm" in path[-1]
  path.append({"weight": "scale" if is_norm else "kernel", "bias": "bias"}[leaf])
  return tuple(path)


def torch_to_ours_shape(name, shape):
  if len(shape) == 4:  # conv OIHW -> HWIO
    o, i, kh, kw = shape
    return (kh, kw, i, o)
  if name == "classifier.weight":  # Linear (out, in) -> (in, out)
    return shape[::-1]
  return shape


def test_every_parameter_shape_is_torchvisions_and_the_counts():
  """(1) Layer for layer torchvision's DenseNet-161 (6-channel stem); (2) 26,486,112 feature
  parameters (BatchNorm scale + bias included, running statistics not) and 2,208-d features."""
  model = build(densenet161_cfg(), abstract=True)
  params = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  expected = {}
  for line in TORCHVISION_DENSENET161.strip().splitlines():
    name, dims = line.split()
    shape = tuple(int(d) for d in dims.split(","))
    expected[ours(name)] = torch_to_ours_shape(name, shape)
  assert len(expected) == 484
  assert params == expected
  # Every BatchNorm's running mean and variance (torch buffers of the norm's width) are
  # BatchStats, not Params.
  stats = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  norms = {p[:-1]: s for p, s in expected.items() if p[-1] == "scale"}
  assert stats == {n + (k,): s for n, s in norms.items() for k in ("mean", "var")}
  head = {("classifier",), ("classifier_bias",)}
  assert sum(int(np.prod(s)) for p, s in params.items() if p not in head) == FEATURES
  assert model.num_features == FEATURE_DIM
  images = jax.ShapeDtypeStruct((2, 64, 64, 6), jnp.uint8)
  assert nnx.eval_shape(lambda m, x: m.embed(x), model, images).shape == (2, FEATURE_DIM)


def test_tiny_forward_backward_loss_accuracy_and_batchnorm_modes():
  """(3) Loss = hand cross-entropy (with and without label smoothing), accuracy, gradients;
  train mode updates the running statistics (torch's momentum), eval mode and embed use them."""
  cfg = tiny_cfg(label_smoothing=0.1)
  model = build(cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, (4, 32, 32, 6)).astype(np.uint8))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  # Train-mode logits depend on the batch only (and update the running statistics of their own
  # copy): the hand cross-entropy's input, and the labels: the first two samples labelled with
  # their argmax, the other two with another class.
  train_logits = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s, copy=True).logits(x))
  logits = train_logits(params, stats, images)
  top = np.asarray(jnp.argmax(logits, -1))
  labels = np.array([top[0], top[1], (top[2] + 1) % 5, (top[3] + 2) % 5], np.int32)

  @jax.jit
  def step(params, stats, batch):
    def loss_fn(p):
      # copy: fresh BatchStat Variables at grad's trace level, which train mode may update.
      m = nnx.merge(graphdef, p, stats, copy=True)
      loss, aux = m(batch, jax.random.key(0))
      # Still in train mode: embed must use (and leave) the running statistics just updated.
      return loss, (aux, m.embed(batch["image"]), nnx.state(m, nnx.BatchStat))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (aux, emb, new_stats)), grads = step(params, stats, dict(image=images, label=labels))
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
  nll = -logp[np.arange(4), labels]
  np.testing.assert_allclose(float(aux["cross_entropy"]), nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(loss), (0.9 * nll - 0.1 * logp.mean(-1)).mean(), rtol=1e-5)
  assert float(aux["accuracy"]) == 0.5
  for path, g in nnx.to_flat_state(grads):
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path
  # Running statistics of the stem's BatchNorm: 0.9 * (0, 1) + 0.1 * the batch's (mean,
  # unbiased variance) of the conv0 output; every BatchStat moved.
  y = np.asarray(model.conv0(mae.standardize(images)), np.float64).reshape(-1, 16)
  new = nnx.merge(graphdef, params, new_stats)
  np.testing.assert_allclose(np.asarray(new.norm0.mean), 0.1 * y.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.norm0.var), 0.9 + 0.1 * y.var(0, ddof=1), rtol=1e-4)
  for (path, a), (_, b) in zip(nnx.to_flat_state(stats), nnx.to_flat_state(new_stats)):
    assert not np.allclose(np.asarray(a), np.asarray(b)), path
  # Eval mode normalises by the running statistics: the stem's output is the hand-normalised
  # one, a sample's logits no longer depend on the rest of the batch (in train mode they do),
  # and the statistics stay put.
  new.eval()
  assert all(m.use_running_average for _, m in nnx.iter_modules(new)
             if isinstance(m, densenet.BatchNorm))
  y32 = jnp.asarray(y.reshape(4, 16, 16, 16), jnp.float32)
  want = (y32 - new.norm0.mean[...]) / jnp.sqrt(new.norm0.var[...] + 1e-5)
  np.testing.assert_allclose(np.asarray(new.norm0(y32)), np.asarray(want), rtol=1e-5, atol=1e-5)
  eval_def = nnx.graphdef(new)

  @jax.jit
  def eval_logits(params, stats, x):
    m = nnx.merge(eval_def, params, stats, copy=True)
    return m.logits(x), nnx.state(m, nnx.BatchStat)

  other = images.at[1:].set(255 - images[1:])
  first, kept = eval_logits(params, new_stats, images)
  second, _ = eval_logits(params, new_stats, other)
  np.testing.assert_allclose(np.asarray(first[0]), np.asarray(second[0]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(logits[0]), train_logits(params, stats, other)[0], atol=1e-3)
  jax.tree.map(np.testing.assert_array_equal, new_stats, kept)
  # embed uses the running statistics even in train mode: the features behind the eval logits.
  assert emb.shape == (4, new.num_features)
  np.testing.assert_allclose(np.asarray(emb @ new.classifier[...] + new.classifier_bias[...]),
                             np.asarray(first), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="DenseNet"):
    new.embed(images, pooling="cls")


def test_flop_model_matches_xla_within_10_percent():
  """(4) flops_per_image against XLA's count of the compiled loss forward and embedding."""
  cfg = tiny_cfg(growth_rate=16, num_init_features=32, image_size=64, num_classes=10)
  graphdef, state = nnx.split(build(cfg, abstract=True))
  batch = dict(image=jax.ShapeDtypeStruct((1, 64, 64, 6), jnp.uint8),
               label=jax.ShapeDtypeStruct((1,), jnp.int32))
  fwd = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, None)[0])
  emb = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))
  xla = [fwd.lower(state, batch).compile().cost_analysis()["flops"],
         emb.lower(state, batch["image"]).compile().cost_analysis()["flops"]]
  flops = densenet.flops_per_image(cfg)
  assert abs(flops["train"] / 3 / xla[0] - 1) < 0.10, (flops, xla)
  assert abs(flops["embed"] / xla[1] - 1) < 0.10, (flops, xla)
