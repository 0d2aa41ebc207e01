threshold = 0.0
checkpoint = "latest"
