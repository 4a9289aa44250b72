from django import forms

from .models import Dataset


class DatasetUploadPageForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Lowercase letters, digits, '-' and '_'.")
    type = forms.ChoiceField(choices=Dataset.Kind.choices)
    description = forms.CharField(required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 2}))
    # hx-preserve: the chosen file stays chosen when the form comes back with errors (htmx).
    file = forms.FileField(
        help_text="JSONL, one JSON object per line.",
        widget=forms.ClearableFileInput(attrs={"hx-preserve": "true", "accept": ".jsonl,.json,.txt,application/jsonl,application/json"}),
    )
