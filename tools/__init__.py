"""Lab scripts and reference implementations. The training code imports one of them, and only
in one regime: pretrain_audio (train.py --audio-regime pretrained-frozen)."""
