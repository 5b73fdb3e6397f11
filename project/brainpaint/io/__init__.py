"""Files: the BraTS case layout, orientation and NIfTI checks (`brats`), atomic writes (`atomic`)."""
