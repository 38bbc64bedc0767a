"""Constants shared by the models, the data pipeline and the command lines."""

# CAER / CAER-S folder names, in label order.
CLASSES = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
NUM_CLASSES = len(CLASSES)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FACE_SIZE = (96, 96)  # H, W of the face crop
CONTEXT_SIZE = (128, 171)  # H, W the masked frame is resized to
CONTEXT_CROP = 112  # square crop taken from the resized context

CLIP_FRAMES = 16  # frames per clip (paper: 16 frames at 10 fps)
CLIP_FPS = 10.0
TEST_CLIP_STRIDE = 8  # 8-frame overlap between test clips
