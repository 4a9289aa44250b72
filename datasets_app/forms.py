from django import forms

from .models import Dataset


class DatasetUploadPageForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Lowercase letters, digits, '-' and '_'.")
    type = forms.ChoiceField(choices=Dataset.Kind.choices)
    description = forms.CharField(required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 2}))
    file = forms.FileField(help_text="JSONL, one JSON object per line.")
