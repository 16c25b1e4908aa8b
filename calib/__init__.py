"""edgemm.calib: calibration sets, activation statistics per stage and modality branch, quantization recipes."""
