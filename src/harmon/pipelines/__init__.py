"""User-facing pipelines: text -> image and image -> text."""
from .editing import EditPipeline, KnownRegion, inpaint_region, outpaint_region, variation_region
from .image_to_text import ChatSession, ImageToTextPipeline
from .text_to_image import TextToImageOutput, TextToImagePipeline

__all__ = ["TextToImagePipeline", "TextToImageOutput", "ImageToTextPipeline", "ChatSession", "EditPipeline",
           "KnownRegion", "inpaint_region", "outpaint_region", "variation_region"]
