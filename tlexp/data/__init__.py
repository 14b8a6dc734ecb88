"""Images in: listing and splitting a tree, decoding checks, the download, transforms, the DataModule."""
