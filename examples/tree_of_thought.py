"""Tree of thought with fork/join: several plans, several solutions per plan, each judged by
`select`; the first solution judged correct is carried into the final answer.

    question ─┬─ plan 1 ─┬─ solution 1.1 ── correct? yes/no
              │          └─ solution 1.2 ── correct? yes/no
              ├─ plan 2 ─┬─ ...
              └─ plan 3 ─┴─ ...

Each fork first caches the text its branches share; the branches then run concurrently and
the engine batches their tokens together.

    python examples/tree_of_thought.py
"""

from __future__ import annotations

from _util import backend_for, parse_args

import radixrt as sgl

QUESTION = "I have 3 apples and buy 2 bags with 4 apples each. Then I eat 2 apples. How many apples do I have?"


@sgl.function
def tree_of_thought(s, question, num_plans=3, num_solutions=2, max_tokens=48):
    s += sgl.system("You are a careful problem solver.")
    s += sgl.user(question)
    s += sgl.assistant_begin()
    s += "Let me think of a few different plans.\n"
    plans = s.fork(num_plans)
    plans += lambda i: f"Plan {i + 1}:" + sgl.gen("plan", max_tokens=max_tokens, stop="\n", temperature=0.7)
    groups = []
    for plan in plans:  # fork waits for this plan's text only; the other plans keep running
        solutions = plan.fork(num_solutions)
        solutions += lambda j: "\nSolution:" + sgl.gen("solution", max_tokens=max_tokens, stop="\n", temperature=0.7)
        solutions += "\nIs this solution correct? " + sgl.select("verdict", ["Yes", "No"])
        groups.append(solutions)
    for solutions in groups:
        solutions.join()  # each plan state gets lists "solution" and "verdict"
    plans.join()  # the root gets "plan", and a list of those lists
    candidates = [
        (plan, solution)
        for plan, solutions, verdicts in zip(s["plan"], s["solution"], s["verdict"])
        for solution, verdict in zip(solutions, verdicts)
        if verdict == "Yes"
    ] or [(s["plan"][0], s["solution"][0][0])]
    plan, solution = candidates[0]
    s += f"The best plan is:{plan}\nSolution:{solution}\nFinal answer:"
    s += sgl.gen("answer", max_tokens=max_tokens, stop="\n", temperature=0)
    s += sgl.assistant_end()


def main(argv=None, backend=None) -> sgl.ProgramState:
    args = parse_args("Tree of thought with fork/join.", argv, max_tokens=48)
    with backend_for(args, backend) as backend:
        state = tree_of_thought.run(QUESTION, max_tokens=args.max_tokens, backend=backend)
    for i, (plan, solutions, verdicts) in enumerate(zip(state["plan"], state["solution"], state["verdict"])):
        print(f"Plan {i + 1}:{plan}")
        for solution, verdict in zip(solutions, verdicts):
            print(f"    Solution:{solution}  [correct? {verdict}]")
    print(f"Final answer:{state['answer']}")
    return state


if __name__ == "__main__":
    main()
