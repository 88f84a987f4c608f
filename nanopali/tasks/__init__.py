"""What particular tasks of the papers need around the model (PaliGemma paper §3.2 and appendix).

    detection.py     `<loc>` answers → boxes in pixels, drawn on the image
    segmentation.py  `<seg>` answers → masks through big_vision's VQ-VAE decoder, pasted into the boxes
    video.py         a video as frames sampled evenly in time, read as several images

Data flows one way: generated text → parse → boxes / masks on the original image; video → frames → processor.
"""
