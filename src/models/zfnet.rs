//! ZFNet (Zeiler & Fergus 2013, "Visualizing and Understanding Convolutional Networks").
//!
//! Zeiler and Fergus visualised AlexNet's first layers and saw dead filters and aliasing from
//! the 11x11 stride-4 first layer; their fix was a 7x7 stride-2 first layer (96 filters) and a
//! stride-2 5x5 second layer (256 filters). The rest follows AlexNet: 3x3 stride-2 overlapping
//! max pooling after conv1, conv2 and conv5, contrast (local response) normalisation after the
//! first two layers, three 3x3 convs (384-384-256), and FC 4096-4096-K with dropout 0.5.
//! Sizes at 224 px input: 110 -> pool 55 -> conv2 26 -> pool 13 -> 13 -> 13 -> 13 -> pool 7,
//! then an adaptive average pool to the paper's 6x6 (the paper's own sizes do not all agree).
//!
//! `zfnet_small`, for 28-32 px input, carries the same lesson down: a 3x3 stride-1 first layer
//! (smaller filters and stride than `alexnet_small`'s 5x5 stride 2) and the stride-2 5x5 second
//! layer, with `alexnet_small`'s widths (64-128-192-192-128), padded pools and 512-wide FC.
//!
//! ZFNet shares [`AlexNet`](super::alexnet::AlexNet)'s module; only the layer list differs.

use super::alexnet::AlexNetConfig;

/// ZFNet as in the paper.
pub fn zfnet(num_classes: usize) -> AlexNetConfig {
    AlexNetConfig::new(
        vec![
            [96, 7, 2, 1, 1],
            [256, 5, 2, 0, 1],
            [384, 3, 1, 1, 1],
            [384, 3, 1, 1, 1],
            [256, 3, 1, 1, 1],
        ],
        vec![0, 1, 4],
        vec![0, 1],
        num_classes,
    )
    .with_pool_pad(1)
}

/// ZFNet scaled for 28-32 px input.
pub fn zfnet_small(num_classes: usize) -> AlexNetConfig {
    AlexNetConfig::new(
        vec![
            [64, 3, 1, 1, 1],
            [128, 5, 2, 2, 1],
            [192, 3, 1, 1, 1],
            [192, 3, 1, 1, 1],
            [128, 3, 1, 1, 1],
        ],
        vec![0, 1, 4],
        vec![0, 1],
        num_classes,
    )
    .with_pool_pad(1)
    .with_hidden(512)
    .with_head_pool(2)
}
