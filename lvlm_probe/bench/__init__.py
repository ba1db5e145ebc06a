"""Behavioural benchmarks: asking models questions and scoring the answers.

* :func:`pope` / :func:`pope_metrics`: POPE with the official answer parser;
* :func:`chair`: CHAIR_i and CHAIR_s of captions;
* :func:`explain_captions`: every object mention of captions explained (sources, image map) and
  each hallucinated one given a cause;
* :func:`misalignment`: object, attribute and relation questions with POPE, CHAIR and a diagnosis
  of every error (:mod:`lvlm_probe.bench.diagnosis`).
"""
from .answers import accuracy_by, ask, first_word
from .caption_causes import CAPTION_CAUSES, CaptionExplanation, explain_captions
from .chair_metric import ChairResult, chair, load_synonyms, shapes_synonyms
from .diagnosis import CAUSES, Diagnosis, diagnose
from .misalignment_benchmark import Misalignment, misalignment
from .pope_benchmark import (
    PARSERS,
    LineProblem,
    PopeResult,
    QuestionFile,
    pope,
    pope_answer,
    pope_metrics,
    read_questions,
)

__all__ = [
    "ask", "accuracy_by", "first_word", "pope", "pope_metrics", "pope_answer", "read_questions", "PARSERS",
    "PopeResult", "QuestionFile", "LineProblem", "chair", "ChairResult", "load_synonyms", "shapes_synonyms",
    "misalignment", "Misalignment", "diagnose", "Diagnosis", "CAUSES", "explain_captions", "CaptionExplanation",
    "CAPTION_CAUSES",
]
