"""Input-grounded prompts for bench/speculative_demo.py: passages and tasks whose answers reuse the
passage's words (copying, correcting, extracting), the workload prompt-lookup drafts are meant for; and
the topics bench/medusa_train.py has the model write its training text on."""

PASSAGES = (
    "The river starts in the northern hills, where snow melts every spring and fills three small lakes. "
    "From the last lake it runs south for 240 kilometers, passing two towns and a wide valley of orchards. "
    "In 1952 a dam was built near the second town to store water for the dry summer months. "
    "Today the reservoir holds enough water for 80,000 people, and the old mill beside it is a museum. "
    "Fishermen still come in the autumn, when the trout swim upstream to the cold water of the hills.",
    "Our library opens at nine in the morning and closes at six in the evening from Monday to Friday. "
    "On Saturdays it opens at ten and closes at two, and on Sundays it stays closed. "
    "Members may borrow up to 12 books at a time for a period of three weeks. "
    "A book can be renewed twice, online or at the front desk, unless another member has reserved it. "
    "Late returns cost twenty cents per book per day, up to a maximum of five dollars per book.",
    "To make the bread, mix 500 grams of flour with 10 grams of salt and 7 grams of dry yeast. "
    "Add 350 milliliters of warm water and stir until no dry flour remains in the bowl. "
    "Cover the bowl and let the dough rest for one hour, then fold it four times from each side. "
    "Shape the dough into a round loaf and let it rise again for forty minutes on a floured cloth. "
    "Bake it at 230 degrees for 35 minutes, until the crust is dark brown and the loaf sounds hollow.",
    "The meeting started at 10:15 with a short report from the finance team. "
    "Sales in the third quarter were 8 percent higher than in the same quarter last year. "
    "The team proposed to hire two new engineers and one designer before the end of the year. "
    "After a long discussion the board approved the plan, but asked for a review in March. "
    "The next meeting will take place on the 14th of November in the large room on the fourth floor.",
    "Honeybees live in colonies of up to 60,000 workers, one queen and a few hundred drones. "
    "The workers build the comb from wax that they produce in glands on the underside of their bodies. "
    "A forager visits between 50 and 100 flowers on a single trip and may fly up to five kilometers. "
    "When she finds a good source of nectar, she returns to the hive and performs a dance for the others. "
    "The angle and the length of the dance tell the other bees the direction and the distance of the "
    "flowers.",
    "The train to the coast leaves platform 4 every hour, at seven minutes past the hour. "
    "The journey takes two hours and twenty minutes, with stops at Millbrook, Ashford and the old harbor. "
    "Bicycles are allowed in the first carriage, but only outside the morning rush between 7 and 9. "
    "Tickets bought on the train cost 15 percent more than tickets bought at the station or online. "
    "On public holidays the timetable changes, and the last train leaves at nine in the evening.",
    "The small robot has four wheels, two cameras and a battery that lasts for about six hours. "
    "It follows a line on the floor and stops when an object appears less than 30 centimeters ahead. "
    "Students program it in Python, using a library that reads the cameras and drives the motors. "
    "In the first lesson they make it move in a square, and in the second lesson they make it avoid boxes. "
    "By the end of the course, each team builds a robot that can find its way out of a simple maze.",
    "The old house at the end of the street was built in 1898 by a sea captain and his wife. "
    "It has eleven rooms, a round tower on the east side and a garden with three apple trees. "
    "After the captain died, the house was a school for twenty years and then a hotel for ten more. "
    "In 2004 the town bought it and opened it as a small museum about ships and the sea. "
    "Visitors can climb the tower on Sundays and see the harbor, the lighthouse and the islands beyond.",
)

# ---------------------------------------------------------------- bench/speculative_demo.py

# Tasks over a passage of two of the PASSAGES (~220 tokens). Answers reuse the passage's words: copying,
# correcting (the passage carries typos: `with_typos`), extracting, repeating then summarizing.
DEMO_TASKS = (
    ("copy", "Copy the following text exactly, word for word, and then stop.\n\n{passage}"),
    ("spelling", "Repeat the following text, correcting the spelling mistakes. Write only the corrected "
     "text.\n\n{passage}"),  # fmt: skip
    ("extract", "Extract every sentence of the following text that contains a number, exactly as "
     "written, one sentence per line.\n\n{passage}"),  # fmt: skip
    ("repeat_summary", "Repeat the text below, then write one sentence that summarizes it.\n\n{passage}"),
)

# Medusa heads are trained on other text than the evaluation's: passages the model writes itself on
# these topics (held out from PASSAGES), then the DEMO_TASKS over them.
TOPICS = (
    "lighthouses", "volcanoes", "a bakery", "the postal service", "honey", "a city park", "rain forests",
    "bicycles", "a school library", "winter sports", "coffee", "the moon", "a train station", "whales",
    "a farmers market", "solar panels", "chess", "a museum", "glaciers", "a hospital", "tea", "bridges",
    "an airport", "deserts", "a zoo", "recycling", "a football club", "the ocean", "a mountain village",
    "computers", "a river boat", "vegetable gardens", "a concert hall", "owls", "a fire station",
    "the printing press", "rice", "a lake in summer", "a clock tower", "camping", "penguins",
    "a bus route", "the human heart", "a bookstore", "wind turbines", "a fishing harbor", "bread making",
    "the planet Mars", "a science fair", "apples", "a swimming pool", "the telephone", "a castle",
    "maple syrup", "a marathon", "an old bridge", "cheese", "a hotel", "a weather station", "salmon",
    "a toy factory", "a subway", "the calendar", "an orchard",
)  # fmt: skip
PASSAGE_REQUESTS = (
    "Write a paragraph of six sentences about {topic}, with some numbers and names.",
    "Write six short sentences of practical facts about {topic}.",
    "Write a short news report of about six sentences about {topic}.",
    "Describe a visit to {topic} in six sentences.",
)


def demo_passage(i: int) -> str:
    """Evaluation passage i: two consecutive PASSAGES."""
    return PASSAGES[i % len(PASSAGES)] + " " + PASSAGES[(i + 1) % len(PASSAGES)]


def demo_task_text(task: int, passage: str) -> str:
    name, template = DEMO_TASKS[task % len(DEMO_TASKS)]
    return template.format(passage=with_typos(passage) if name == "spelling" else passage)


def demo_eval_texts(n: int) -> list[str]:
    """n evaluation requests; any 4 consecutive ones cover the 4 tasks, the first 32 are distinct."""
    return [demo_task_text(i, demo_passage(i + i // len(DEMO_TASKS))) for i in range(n)]


def with_typos(text: str, every: int = 5) -> str:
    """Deterministic misspellings: in every `every`-th word of 5+ letters two middle letters swap."""
    words = text.split(" ")
    for i in range(3, len(words), every):
        w = words[i]
        core = w.rstrip(".,;:!?")
        if len(core) >= 5 and core.isalpha():
            j = len(core) // 2
            words[i] = core[: j - 1] + core[j] + core[j - 1] + core[j + 1 :] + w[len(core) :]
    return " ".join(words)
