"""The router's HTTP routes: the OpenAI API (`openai.py`) and the fleet admin API (`admin.py`)."""
