"""The reference implementations the metric tests compare with: official evaluation code, vendored
(with its licence) where its licence allows, else its published rule restated step by step."""
