"""Image tables, decoding, the tf.data pipelines, rasters, multisource views, backbone
features and the chunk store."""
